//! The sbatch script for a run on an Isambard-AI-style cluster: one task per GPU, the NCCL/libfabric settings for
//! Slingshot, a USR1 warning before the time limit that every rank turns into a checkpoint at the same step, and a
//! requeue when the ranks exit with the "requeue me" code, so the next job resumes by itself.

use std::collections::BTreeMap;

/// The exit code with which every rank says "checkpointed, please requeue me".
pub const REQUEUE_EXIT_CODE: i32 = 75;

/// The NCCL and libfabric settings of `module load brics/nccl` on Slingshot (shared/design/cluster.md); with
/// `NCCL_NET="AWS Libfabric"` a missing plugin fails the job instead of falling back to TCP.
pub fn slingshot_nccl_env() -> BTreeMap<String, String> {
    [
        ("NCCL_NET", "AWS Libfabric"),
        ("NCCL_SOCKET_IFNAME", "hsn"),
        ("NCCL_NET_GDR_LEVEL", "PHB"),
        ("NCCL_CROSS_NIC", "1"),
        ("NCCL_MIN_NCHANNELS", "4"),
        ("NCCL_GDRCOPY_ENABLE", "1"),
        ("NCCL_NET_FORCE_FLUSH", "0"),
        ("FI_CXI_DEFAULT_CQ_SIZE", "131072"),
        ("FI_CXI_DEFAULT_TX_SIZE", "2048"),
        ("FI_CXI_DISABLE_NON_INJECT_MSG_IDC", "1"),
        ("FI_HMEM_CUDA_USE_GDRCOPY", "1"),
        ("FI_CXI_DISABLE_HOST_REGISTER", "1"),
        ("FI_MR_CACHE_MONITOR", "userfaultfd"),
        ("FI_CXI_RDZV_PROTO", "alt_read"),
        ("FI_CXI_RDZV_THRESHOLD", "0"),
        ("FI_CXI_RDZV_GET_MIN", "0"),
        ("FI_CXI_RDZV_EAGER_SIZE", "0"),
        ("FI_CXI_RX_MATCH_MODE", "hybrid"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Everything the script needs.
#[derive(Debug, Clone, PartialEq)]
pub struct SlurmJob {
    pub job_name: String,
    pub nodes: u32,
    pub gpus_per_node: u32,
    pub cpus_per_task: u32,
    /// `HH:MM:SS` or `D-HH:MM:SS`.
    pub time_limit: String,
    pub partition: Option<String>,
    pub account: Option<String>,
    /// Seconds before the limit at which Slurm sends USR1 (it may arrive up to 60 s early).
    pub warn_seconds: u32,
    pub run_dir: String,
    pub radit: String,
    pub config: String,
    /// Added to (and overriding) the Slingshot NCCL settings.
    pub env: BTreeMap<String, String>,
}

impl SlurmJob {
    /// Isambard-AI defaults: 4 GH200 per node, 72 cores per GPU, 24-hour jobs, warned 5 minutes before the end.
    pub fn isambard(job_name: &str, nodes: u32, run_dir: &str, radit: &str, config: &str) -> Self {
        Self {
            job_name: job_name.into(),
            nodes,
            gpus_per_node: 4,
            cpus_per_task: 72,
            time_limit: "24:00:00".into(),
            partition: None,
            account: None,
            warn_seconds: 300,
            run_dir: run_dir.into(),
            radit: radit.into(),
            config: config.into(),
            env: BTreeMap::new(),
        }
    }
}

/// Quotes a value for a POSIX shell.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Renders the sbatch script (pure: same job, same text).
pub fn render_sbatch(job: &SlurmJob) -> String {
    let mut s = String::new();
    let mut line = |l: &str| {
        s.push_str(l);
        s.push('\n');
    };
    line("#!/bin/bash");
    line(
        "# Rendered by radit; re-render rather than edit (`radit run JOB.toml --dry-run` prints it).",
    );
    line(&format!("#SBATCH --job-name={}", quote(&job.job_name)));
    line(&format!("#SBATCH --nodes={}", job.nodes));
    line(&format!("#SBATCH --ntasks-per-node={}", job.gpus_per_node));
    line(&format!("#SBATCH --gpus-per-node={}", job.gpus_per_node));
    line(&format!("#SBATCH --cpus-per-task={}", job.cpus_per_task));
    line(&format!("#SBATCH --time={}", job.time_limit));
    line(&format!("#SBATCH --signal=B:USR1@{}", job.warn_seconds));
    line("#SBATCH --requeue");
    line("#SBATCH --open-mode=append");
    line(&format!("#SBATCH --output={}/slurm-%j.out", job.run_dir));
    if let Some(p) = &job.partition {
        line(&format!("#SBATCH --partition={}", quote(p)));
    }
    if let Some(a) = &job.account {
        line(&format!("#SBATCH --account={}", quote(a)));
    }
    line("set -uo pipefail");
    line("");
    line("# NCCL over Slingshot (the settings of `module load brics/nccl`), then the job's own.");
    let mut env = slingshot_nccl_env();
    env.extend(job.env.clone());
    for (k, v) in &env {
        line(&format!("export {k}={}", quote(v)));
    }
    line(&format!("export RADIT_RUN_DIR={}", quote(&job.run_dir)));
    line("# The first node hosts the rendezvous.");
    line("RADIT_MASTER_HOST=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)");
    line("export RADIT_MASTER_HOST");
    line("");
    line(
        "# Slurm warns only this batch shell (B:USR1); pass the warning, and a preemption's TERM, on to every rank.",
    );
    line(
        "# Each rank sets a flag; the flags are combined at the next step boundary, every rank checkpoints at the",
    );
    line(&format!("# same step and exits with {REQUEUE_EXIT_CODE}."));
    line("forward() { kill -s \"$1\" \"$srun_pid\" 2>/dev/null; }");
    line("trap 'forward USR1' USR1");
    line("trap 'forward TERM' TERM");
    line(&format!(
        "srun --kill-on-bad-exit=1 --cpu-bind=none {} train --device cuda --config {} &",
        quote(&job.radit),
        quote(&job.config)
    ));
    line("srun_pid=$!");
    line(
        "# `wait` returns early when a trapped signal arrives: keep waiting until srun itself has ended.",
    );
    line("while kill -0 \"$srun_pid\" 2>/dev/null; do wait \"$srun_pid\"; done");
    line("wait \"$srun_pid\"; status=$?");
    line(&format!("if [ \"$status\" -eq {REQUEUE_EXIT_CODE} ]; then"));
    line("  echo \"radit: checkpointed before the time limit; requeueing job $SLURM_JOB_ID\"");
    line("  scontrol requeue \"$SLURM_JOB_ID\"");
    line("  exit 0");
    line("fi");
    line("exit \"$status\"");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden(name: &str, text: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|_| panic!("{} is missing: run with UPDATE_GOLDEN=1", path.display()));
        assert_eq!(
            text,
            want,
            "{} changed: review, then UPDATE_GOLDEN=1",
            path.display()
        );
    }

    #[test]
    fn the_xl_script_matches_its_golden_file() {
        let mut job = SlurmJob::isambard(
            "radit-xl",
            8,
            "/scratch/radit/xl",
            "/home/u/radit/bin/radit",
            "/scratch/radit/xl/run.toml",
        );
        job.account = Some("brics.a5k".into());
        job.env.insert("NCCL_DEBUG".into(), "WARN".into());
        let text = render_sbatch(&job);
        assert!(
            text.contains(
                "#SBATCH --nodes=8\n#SBATCH --ntasks-per-node=4\n#SBATCH --gpus-per-node=4"
            )
        );
        assert!(text.contains("#SBATCH --signal=B:USR1@300"));
        assert!(text.contains("export NCCL_NET='AWS Libfabric'"));
        assert!(text.contains("export FI_MR_CACHE_MONITOR=userfaultfd"));
        golden("sbatch-xl.sh", &text);
    }

    #[test]
    fn values_are_shell_quoted() {
        assert_eq!(quote("plain-value_1.0"), "plain-value_1.0");
        assert_eq!(quote("has space"), "'has space'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }
}
