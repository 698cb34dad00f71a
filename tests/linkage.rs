//! The built binary links what a GPU run needs: with a CUDA libtorch, `libtorch_cuda.so` must be in the ELF
//! `NEEDED` list (the linker's `--as-needed` drops it otherwise, and libtorch then reports no GPU), and the rpath
//! points at the libtorch it was built against. And the GPU check (scripts/gpu-check.sh) fits the machine it is
//! made for: its plan within the deadline, at most 4 files back, every part run through on the CPU, and a deadline
//! that cuts it short still leaves its summary.

use std::path::{Path, PathBuf};

fn dynamic_section(bin: &Path) -> (Vec<String>, Vec<String>) {
    let bytes = std::fs::read(bin).unwrap();
    let elf = goblin::elf::Elf::parse(&bytes).expect("an ELF binary");
    let needed = elf.libraries.iter().map(|s| s.to_string()).collect();
    let mut paths: Vec<String> = elf.runpaths.iter().map(|s| s.to_string()).collect();
    paths.extend(elf.rpaths.iter().map(|s| s.to_string()));
    (needed, paths)
}

#[test]
fn the_binary_needs_libtorch_cuda_whenever_its_libtorch_is_a_cuda_build() {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_radit"));
    let (needed, paths) = dynamic_section(&bin);
    assert!(needed.iter().any(|n| n == "libtorch_cpu.so"), "{needed:?}");
    let torch_dirs: Vec<PathBuf> = paths
        .iter()
        .flat_map(|p| p.split(':'))
        .map(PathBuf::from)
        .filter(|d| d.join("libtorch_cpu.so").exists())
        .collect();
    assert!(
        !torch_dirs.is_empty(),
        "no rpath entry holds the libtorch the binary was built against: {paths:?}"
    );
    let cuda_build = torch_dirs
        .iter()
        .any(|d| d.join("libtorch_cuda.so").exists());
    if cuda_build {
        assert!(
            needed.iter().any(|n| n == "libtorch_cuda.so"),
            "a CUDA libtorch is linked but libtorch_cuda.so is not NEEDED: {needed:?}"
        );
    }
    // The project's pinned wheel is a CUDA build: on the machines CI runs on, the check above is not vacuous.
    assert!(
        cuda_build,
        "expected the pip CUDA wheel of PyTorch in {torch_dirs:?}"
    );
}

/// The lent GPU machine returns at most 8 files; the check promises 4.
const MOST_FILES: usize = 4;

fn gpu_check(
    out: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::Output, serde_json::Value) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = out.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let result = std::process::Command::new("bash")
        .arg(repo.join("scripts/gpu-check.sh"))
        .args(args)
        .env("OUT", out.join("out"))
        .env("TMPDIR", &tmp)
        .env("RADIT_BIN", env!("CARGO_BIN_EXE_radit"))
        .env("PYTHON", venv_python())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let files: Vec<_> = std::fs::read_dir(out.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        files.len() <= MOST_FILES,
        "{} files come back, at most {MOST_FILES}: {files:?}",
        files.len()
    );
    let summary = std::fs::read_to_string(out.join("out/summary.json")).unwrap_or_else(|e| {
        panic!(
            "no summary ({e}): {}\n{}",
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        )
    });
    (result, serde_json::from_str(&summary).unwrap())
}

fn venv_python() -> PathBuf {
    let cache = std::env::var("RADIT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/radit"));
    cache.join("torch-2.13.0/bin/python")
}

fn statuses(summary: &serde_json::Value) -> Vec<(String, String)> {
    summary["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn the_gpu_check_plan_fits_its_deadline_and_file_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (out, summary) = gpu_check(dir.path(), &["--dry-run"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (planned, deadline) = (
        summary["planned_seconds"].as_u64().unwrap(),
        summary["deadline_seconds"].as_u64().unwrap(),
    );
    // 10 s is kept back for writing the summary; the device call's own limit is 600 s with the start.
    assert!(planned + 10 <= deadline && deadline <= 480, "{summary}");
    let names: Vec<String> = statuses(&summary).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "info",
            "step-bf16",
            "nccl",
            "bench-xl",
            "bench-b",
            "bench-unet",
            "parity",
            "encode"
        ],
        "the most valuable parts first"
    );
    let plan = std::fs::read_to_string(dir.path().join("out/check.log")).unwrap();
    assert!(
        plan.contains("engine bench xl-latent --device $device --precision bf16 --batch 16"),
        "{plan}"
    );
    assert!(
        plan.contains("selftest collectives --device $device --nccl"),
        "{plan}"
    );
    // A deadline past what the machine allows is refused.
    let (out, _) = gpu_check(dir.path(), &["--dry-run"], &[("DEADLINE", "900")]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_gpu_check_runs_through_on_the_cpu_and_a_near_deadline_skips_parts_but_keeps_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let cpu = [("DEVICE", "cpu"), ("RUST_LOG", "warn")];
    let (out, summary) = gpu_check(dir.path(), &["4", "1"], &cpu);
    assert!(
        out.status.success(),
        "{summary}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        statuses(&summary).iter().all(|(_, s)| s == "ok"),
        "{summary}"
    );
    let xl = &summary["parts"][3]["numbers"][0];
    assert!(
        xl["tokens_per_second_per_device"].as_f64().unwrap() > 0.0,
        "{summary}"
    );
    // The U-Net part trains RadUNet data-parallel (on the CPU, the tiny preset).
    let unet = &summary["parts"][5]["numbers"][0];
    assert_eq!(unet["mode"], "ddp", "{summary}");
    let parity = &summary["parts"][6]["numbers"][0];
    assert_eq!(parity["passed"], true, "{summary}");
    assert!(parity["weights"]["worst"].is_string(), "{summary}");
    let log = std::fs::read_to_string(dir.path().join("out/check.log")).unwrap();
    assert!(log.contains("== encode"), "one combined log: {log}");

    // A deadline that leaves room for the first parts only: the rest are skipped, the summary is still written.
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let (out, summary) = gpu_check(
        dir.path(),
        &["4", "1"],
        &[cpu[0], cpu[1], ("DEADLINE", "16")],
    );
    assert_eq!(out.status.code(), Some(1), "{summary}");
    assert!(
        started.elapsed().as_secs() < 16 + 10,
        "{:?}",
        started.elapsed()
    );
    let st = statuses(&summary);
    assert_eq!(st.last().unwrap().1, "skipped", "{summary}");
    assert!(
        !summary["not_ok"].as_array().unwrap().is_empty(),
        "{summary}"
    );
}
