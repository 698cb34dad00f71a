//! Helpers shared by the end-to-end suites: the `radit` binary, the project's Python, services on 127.0.0.1.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn radit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_radit"))
}

/// The virtualenv that scripts/setup.sh installs (torch, zarr, moto...).
pub fn venv() -> PathBuf {
    if let Ok(v) = std::env::var("RADIT_VENV") {
        return PathBuf::from(v);
    }
    let cache = std::env::var("RADIT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let home = std::env::var("HOME").expect("HOME is set");
            Path::new(&home).join(".cache/radit")
        });
    cache.join("torch-2.13.0")
}

pub fn python() -> Command {
    let exe = venv().join("bin/python");
    assert!(
        exe.exists(),
        "{} is missing: run scripts/setup.sh",
        exe.display()
    );
    Command::new(exe)
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd`, panicking with its output unless it exits 0.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("command starts");
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind loopback")
        .local_addr()
        .expect("local addr")
        .port()
}

/// Writes a small synthetic dataset under `dir` and returns (table, images).
pub fn synth(dir: &Path, images: u64, sizes: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
    let mut cmd = radit();
    cmd.args(["synth", "--out"]).arg(dir).args([
        "--images",
        &images.to_string(),
        "--seed",
        "3",
        "--sizes",
        sizes,
    ]);
    cmd.args(extra);
    run_ok(&mut cmd);
    (dir.join("table.csv"), dir.join("images"))
}

/// Shards `table` + `images` into `<dir>/store` with the small settings of [`shard_cmd`]; returns the store path.
pub fn shard_into(dir: &Path, table: &Path, images: &Path) -> PathBuf {
    let store = dir.join("store");
    run_ok(&mut shard_cmd(
        table,
        images,
        store.to_str().expect("UTF-8 temp path"),
        &[],
    ));
    store
}

/// Synthesises `images` CXR-like images of `sizes` under `dir/synth` and shards them at 16x16 (the tiny presets'
/// size) in shards of `shard_images` into `dir/store`, passing `extra` to `radit shard`; returns the store.
pub fn tiny_store(
    dir: &Path,
    images: u64,
    sizes: &str,
    shard_images: u32,
    extra: &[&str],
) -> PathBuf {
    let (table, pngs) = synth(&dir.join("synth"), images, sizes, &[]);
    let store = dir.join("store");
    let mut cmd = radit();
    cmd.args(["shard", "--no-progress"])
        .args(extra)
        .arg("--table")
        .arg(&table)
        .arg("--images")
        .arg(&pngs)
        .args(["--out", store.to_str().expect("UTF-8 temp path")])
        .args([
            "--image-size",
            "16",
            "--shard-images",
            &shard_images.to_string(),
        ]);
    run_ok(&mut cmd);
    store
}

/// The tiny TorchScript feature network of `tests/python/feature_twin.py` (`[B, 3, 32, 32]` in [0, 1] ->
/// `[B, 24]`), exported to `dir/net.pt`.
pub fn feature_net(dir: &Path) -> PathBuf {
    let net = dir.join("net.pt");
    run_ok(
        python()
            .arg(repo().join("tests/python/feature_twin.py"))
            .arg("export")
            .arg(&net),
    );
    net
}

/// `radit eval features` of `source` (`--store S --split X ...` or `--samples DIR`) through the tiny network of
/// [`feature_net`] at its side of 32, on the CPU, into `out` (its `.ids.txt` and `.json` beside it).
pub fn tiny_features(net: &Path, source: &[&str], out: &Path) -> PathBuf {
    run_ok(
        radit()
            .args([
                "eval",
                "features",
                "--input-size",
                "32",
                "--device",
                "cpu",
                "--net",
            ])
            .arg(net)
            .args(source)
            .arg("--out")
            .arg(out),
    );
    out.to_path_buf()
}

/// Random weights of the tiny preset (seed 4) at `dir/w.safetensors`: samples that need not look like anything.
pub fn tiny_weights(dir: &Path) -> PathBuf {
    let w = dir.join("w.safetensors");
    run_ok(
        radit()
            .args(["model", "init", "tiny", "--seed", "4", "--out"])
            .arg(&w),
    );
    w
}

/// `radit generate` on one thread: `weights`, the profiles of `store`, into `out`, with `extra` flags.
pub fn generate_cmd(weights: &Path, store: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = radit();
    cmd.args(["generate", "--threads", "1", "--weights"])
        .arg(weights)
        .arg("--profiles")
        .arg(store)
        .arg("--out")
        .arg(out)
        .args(extra);
    cmd
}

/// Writes a job spec to `dir/job.toml` after checking that it reads as one (a typo in a test's job fails here,
/// naming the field, instead of as a confusing run failure later); returns its path.
pub fn write_job(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("job.toml");
    radit_run::job::JobSpec::from_toml(text)
        .unwrap_or_else(|e| panic!("the test's job spec does not read: {e}\n{text}"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Writes a train config to `path` after checking that it reads and validates as one; returns the path.
pub fn write_train_config(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    radit_jobs::train::TrainConfig::load(path)
        .unwrap_or_else(|e| panic!("the test's train config does not validate: {e}\n{text}"));
    path.to_path_buf()
}

/// `radit shard` with small, fast settings.
pub fn shard_cmd(table: &Path, images: &Path, out: &str, extra: &[&str]) -> Command {
    let mut cmd = radit();
    cmd.args(["shard", "--no-progress", "--table"])
        .arg(table)
        .arg("--images")
        .arg(images)
        .args(["--out", out, "--image-size", "64", "--shard-images", "8"])
        .args(extra);
    cmd
}

/// Runs tests/python/check_store.py: zarr-python reads `store` and checks it against the table and images on its
/// own; its JSON summary goes to `summary`.
pub fn check_store_with_zarr_python(store: &Path, table: &Path, images: &Path, summary: &Path) {
    run_ok(
        python()
            .arg(repo().join("tests/python/check_store.py"))
            .arg("--store")
            .arg(store)
            .arg("--table")
            .arg(table)
            .arg("--images")
            .arg(images)
            .arg("--out")
            .arg(summary),
    );
}

/// A moto S3 server on 127.0.0.1 (from the project's virtualenv), stopped on drop.
pub struct MotoServer {
    child: std::process::Child,
    pub endpoint: String,
}

impl MotoServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server that checks credentials as S3 does (moto's IAM emulation from the first request): only keys it
    /// issued are accepted, so any other key is refused with 403 InvalidAccessKeyId.
    pub fn start_checking_credentials() -> Self {
        Self::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")])
    }

    fn start_with(env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let exe = venv().join("bin/moto_server");
        assert!(
            exe.exists(),
            "{} is missing: run scripts/setup.sh",
            exe.display()
        );
        let child = Command::new(exe)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let server = MotoServer {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "moto_server did not listen on {port} within 60 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        server
    }

    /// Environment for object_store and boto3 to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ]
    }

    /// The server's process id (a test pauses it with SIGSTOP to stall the store).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn create_bucket(&self, bucket: &str) {
        run_ok(python().envs(self.env()).args([
            "-c",
            "import boto3, sys; boto3.client('s3').create_bucket(Bucket=sys.argv[1])",
            bucket,
        ]));
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the single-host Slurm of scripts/slurm-local.sh (installing it if needed); returns SLURM_CONF.
#[allow(dead_code)]
pub fn local_slurm() -> String {
    let out = run_ok(Command::new(repo().join("scripts/slurm-local.sh")).arg("start"));
    stdout(&out)
        .lines()
        .find_map(|l| l.strip_prefix("export SLURM_CONF="))
        .expect("slurm-local.sh prints SLURM_CONF")
        .to_string()
}

/// A safetensors file's tensors by name (twin outputs).
pub fn read_tensors(path: &Path) -> std::collections::BTreeMap<String, radit_models::tch::Tensor> {
    radit_models::tch::Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// ||a - b|| / ||b||, in f64 (||a - b|| when b is zero): how parity with a twin is measured.
pub fn relative_error(a: &radit_models::tch::Tensor, b: &radit_models::tch::Tensor) -> f64 {
    use radit_models::tch::Kind;
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let diff = (&a - &b).norm().double_value(&[]);
    let scale = b.norm().double_value(&[]);
    if scale == 0.0 { diff } else { diff / scale }
}

/// Runs `cmd`, which must fail as bad input (exit 2) with `needle` in its stderr; returns that stderr.
pub fn fails_with_usage(cmd: &mut Command, needle: &str) -> String {
    let out = cmd.output().expect("the command starts");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    err
}

/// Runs `cmd` and checks it ran out of memory as radit reports it: exit 2 (not retryable), the report's parts in
/// `wants`, the allocator's own words, and no panic. Returns stderr.
pub fn fails_out_of_memory(cmd: &mut Command, wants: &[&str]) -> String {
    let out = cmd.output().expect("the command starts");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for want in wants
        .iter()
        .chain(&["can't allocate memory", "A restart would fail the same way"])
    {
        assert!(err.contains(want), "expected `{want}` in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// What the loader says when a latent model opens `store` and cannot use its latents.
pub fn latents_open_error(store: &Path) -> String {
    radit_sharding::loader::Loader::open(
        radit_sharding::store::Storage::open_existing(store.to_str().unwrap()).unwrap(),
        radit_sharding::loader::LoaderConfig {
            output: radit_sharding::loader::ModelInput::Latents,
            global_batch: 8,
            ..radit_sharding::loader::LoaderConfig::default()
        },
        0,
    )
    .err()
    .expect("the loader refuses these latents")
    .to_string()
}

/// A two-level RadUNet with dropout in every block: the `[model.unet]` section of the U-Net tests' configs (the
/// tiny store's 16x16 images).
pub const TINY_UNET: &str = r#"[model.unet]
img_resolution = 16
img_channels = 1
model_channels = 16
channel_mult = [1, 2]
num_blocks = 1
attn_resolutions = [8]
channels_per_head = 16
dropout = 0.25
"#;
