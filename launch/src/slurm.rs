//! The sbatch script for a run on an Isambard-AI-style cluster: one task per GPU, the NCCL/libfabric settings for
//! Slingshot, a USR1 warning before the time limit that every rank turns into a checkpoint at the same step, and a
//! requeue when the ranks exit with the "requeue me" code, so the next job resumes by itself.

use std::collections::BTreeMap;

use radit_protocol::REQUEUE_EXIT_CODE;

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
    /// One task per rank.
    pub tasks_per_node: u32,
    /// 0 for CPU ranks.
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
    /// The job spec; the batch step runs `radit run JOB --in-allocation` (coordinator + one srun task per rank).
    pub job_file: String,
    /// Added to (and overriding) the Slingshot NCCL settings.
    pub env: BTreeMap<String, String>,
    /// Environment modules loaded first (`module load ...`), e.g. the site's NCCL with its libfabric plugin.
    pub modules: Vec<String>,
    /// A sweep: one array task per run, each running its own job file in its own run directory (`job_file` and
    /// `run_dir` above are then the sweep's). Empty for one job.
    pub array: Vec<ArrayTask>,
}

/// One task of a Slurm array: a run of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct ArrayTask {
    pub job_file: String,
    pub run_dir: String,
}

impl SlurmJob {
    /// Isambard-AI defaults: 4 GH200 per node, 72 cores per GPU, 24-hour jobs, warned 5 minutes before the end.
    pub fn isambard(
        job_name: &str,
        nodes: u32,
        run_dir: &str,
        radit: &str,
        job_file: &str,
    ) -> Self {
        Self {
            job_name: job_name.into(),
            nodes,
            tasks_per_node: 4,
            gpus_per_node: 4,
            cpus_per_task: 72,
            time_limit: "24:00:00".into(),
            partition: None,
            account: None,
            warn_seconds: 300,
            run_dir: run_dir.into(),
            radit: radit.into(),
            job_file: job_file.into(),
            env: BTreeMap::new(),
            modules: Vec::new(),
            array: Vec::new(),
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

/// The shell lines that export the Slingshot NCCL settings only when the libfabric plugin (aws-ofi-nccl,
/// `libnccl-net*.so`) is on the library path: with `NCCL_NET="AWS Libfabric"` and no plugin, NCCL fails the job.
/// Without it NCCL uses its own sockets (slow on Slingshot), and the script says so.
pub fn nccl_plugin_block() -> String {
    let mut s = String::from(
        "# NCCL over Slingshot needs the libfabric plugin (aws-ofi-nccl): its settings (those of `module load brics/nccl`)\n\
         # are exported only when the plugin is on the library path.\n\
         radit_nccl_plugin=\n\
         IFS=: read -ra radit_lib_dirs <<< \"${LD_LIBRARY_PATH:-}\"\n\
         for d in \"${radit_lib_dirs[@]}\" /usr/lib64 /usr/lib/aarch64-linux-gnu; do\n\
         \x20 for f in \"$d\"/libnccl-net*.so; do\n\
         \x20   if [ -e \"$f\" ]; then radit_nccl_plugin=$f; break 2; fi\n\
         \x20 done\n\
         done\n\
         if [ -n \"$radit_nccl_plugin\" ]; then\n\
         \x20 echo \"radit: NCCL libfabric plugin $radit_nccl_plugin\"\n",
    );
    for (k, v) in slingshot_nccl_env() {
        s.push_str(&format!("  export {k}={}\n", quote(&v)));
    }
    s.push_str(
        "else\n\
         \x20 echo \"radit: WARNING: no NCCL libfabric plugin (libnccl-net*.so) on LD_LIBRARY_PATH: NCCL falls back to \
         TCP sockets, far slower on Slingshot; load the site's NCCL module ([launcher.slurm] modules)\" >&2\n\
         fi\n",
    );
    s
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
    line(&format!("#SBATCH --ntasks-per-node={}", job.tasks_per_node));
    if job.gpus_per_node > 0 {
        line(&format!("#SBATCH --gpus-per-node={}", job.gpus_per_node));
    }
    line(&format!("#SBATCH --cpus-per-task={}", job.cpus_per_task));
    line(&format!("#SBATCH --time={}", job.time_limit));
    line(&format!("#SBATCH --signal=B:USR1@{}", job.warn_seconds));
    line("#SBATCH --requeue");
    line("#SBATCH --open-mode=append");
    if job.array.is_empty() {
        line(&format!("#SBATCH --output={}/slurm-%j.out", job.run_dir));
    } else {
        line(&format!("#SBATCH --array=0-{}", job.array.len() - 1));
        line(&format!("#SBATCH --output={}/slurm-%A_%a.out", job.run_dir));
    }
    if let Some(p) = &job.partition {
        line(&format!("#SBATCH --partition={}", quote(p)));
    }
    if let Some(a) = &job.account {
        line(&format!("#SBATCH --account={}", quote(a)));
    }
    // Modules first (site module scripts do not all survive `set -u`).
    for m in &job.modules {
        line(&format!("module load {}", quote(m)));
    }
    line("set -uo pipefail");
    line("");
    if job.gpus_per_node > 0 {
        for l in nccl_plugin_block().lines() {
            line(l);
        }
    }
    if !job.env.is_empty() {
        line("# The job's own environment ([launcher.slurm] env).");
    }
    for (k, v) in &job.env {
        line(&format!("export {k}={}", quote(v)));
    }
    let job_file = if job.array.is_empty() {
        line(&format!("export RADIT_RUN_DIR={}", quote(&job.run_dir)));
        quote(&job.job_file)
    } else {
        line("# A sweep: this array task runs one of its runs, in that run's own directory.");
        let list = |f: &dyn Fn(&ArrayTask) -> &str| {
            job.array
                .iter()
                .map(|t| quote(f(t)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        line(&format!("radit_job_files=({})", list(&|t| &t.job_file)));
        line(&format!("radit_run_dirs=({})", list(&|t| &t.run_dir)));
        line("radit_job_file=${radit_job_files[$SLURM_ARRAY_TASK_ID]}");
        line("export RADIT_RUN_DIR=${radit_run_dirs[$SLURM_ARRAY_TASK_ID]}");
        "\"$radit_job_file\"".to_string()
    };
    line(
        "# This batch step runs on the first node: it hosts the coordinator and starts one srun task per rank,",
    );
    line("# restarting them from the last checkpoint when one fails.");
    line("");
    line(
        "# Slurm warns only this batch shell (B:USR1); pass the warning, and a preemption's TERM, on to radit, which",
    );
    line(
        "# tells every rank; the ranks' flags are combined at the next step boundary, every rank checkpoints at the",
    );
    line(&format!(
        "# same step and radit exits with {REQUEUE_EXIT_CODE}."
    ));
    line("forward() { kill -s \"$1\" \"$radit_pid\" 2>/dev/null; }");
    line("trap 'forward USR1' USR1");
    line("trap 'forward TERM' TERM");
    line(&format!(
        "{} run {} --in-allocation &",
        quote(&job.radit),
        job_file
    ));
    line("radit_pid=$!");
    line(
        "# `wait` returns early when a trapped signal arrives: keep waiting until radit itself has ended.",
    );
    line("while kill -0 \"$radit_pid\" 2>/dev/null; do wait \"$radit_pid\"; done");
    line("wait \"$radit_pid\"; status=$?");
    line(&format!("if [ \"$status\" -eq {REQUEUE_EXIT_CODE} ]; then"));
    line("  echo \"radit: checkpointed before the time limit; requeueing job $SLURM_JOB_ID\"");
    line("  scontrol requeue \"$SLURM_JOB_ID\"");
    line("  exit 0");
    line("fi");
    line("exit \"$status\"");
    s
}

/// What Slurm said no to, or could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error("could not run `{command}` (is Slurm installed and SLURM_CONF set?)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Refused { command: String, stderr: String },
    #[error("`{command}` printed something unexpected: {output}")]
    Unexpected { command: String, output: String },
}

fn slurm_command(program: &str, args: &[&str]) -> Result<String, SlurmError> {
    let command = format!("{program} {}", args.join(" "));
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|source| SlurmError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(SlurmError::Refused {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Submits a rendered script with the real `sbatch`; returns the job id.
pub fn submit(script: &std::path::Path) -> Result<u64, SlurmError> {
    let path = script.display().to_string();
    let out = slurm_command("sbatch", &["--parsable", &path])?;
    out.trim()
        .split(';')
        .next()
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| SlurmError::Unexpected {
            command: format!("sbatch --parsable {path}"),
            output: out.clone(),
        })
}

/// A job's state as Slurm reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStatus {
    /// PENDING, RUNNING, REQUEUED, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    pub state: String,
    /// The batch script's exit code, once known.
    pub exit_code: Option<i32>,
}

impl JobStatus {
    /// Slurm will not run this job again.
    pub fn is_final(&self) -> bool {
        matches!(
            self.state.as_str(),
            "COMPLETED"
                | "FAILED"
                | "CANCELLED"
                | "TIMEOUT"
                | "NODE_FAIL"
                | "OUT_OF_MEMORY"
                | "BOOT_FAIL"
                | "DEADLINE"
        )
    }
}

/// The job's state: `squeue` while it is queued or running, `scontrol show job` (which also gives the exit code)
/// for recently finished jobs (`sacct` needs accounting storage, which small test clusters lack).
pub fn status(job_id: u64) -> Result<JobStatus, SlurmError> {
    let id = job_id.to_string();
    let out = slurm_command("scontrol", &["show", "job", "-o", &id]);
    let field = |text: &str, key: &str| {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key).map(str::to_string))
    };
    match out {
        Ok(text) => {
            let state = field(&text, "JobState=").ok_or_else(|| SlurmError::Unexpected {
                command: format!("scontrol show job -o {id}"),
                output: text.clone(),
            })?;
            let exit_code = field(&text, "ExitCode=")
                .and_then(|v| v.split(':').next().and_then(|c| c.parse().ok()));
            Ok(JobStatus { state, exit_code })
        }
        Err(_) => {
            let q = slurm_command("squeue", &["-h", "-j", &id, "-o", "%T"])?;
            Ok(JobStatus {
                state: q.trim().to_string(),
                exit_code: None,
            })
        }
    }
}

/// Polls the job until Slurm is done with it (through requeues), calling `on_change` at each new state. Returns
/// `None` when `stop()` says to stop following (the job itself goes on). A few failed polls in a row are retried
/// (slurmctld restarts, RPC timeouts); more are an error.
pub fn follow(
    job_id: u64,
    poll: std::time::Duration,
    mut on_change: impl FnMut(&JobStatus),
    stop: impl Fn() -> bool,
) -> Result<Option<JobStatus>, SlurmError> {
    const TRIES: u32 = 5;
    let mut last: Option<JobStatus> = None;
    let mut failures = 0;
    loop {
        if stop() {
            return Ok(None);
        }
        match status(job_id) {
            Ok(now) if !now.state.is_empty() => {
                failures = 0;
                if last.as_ref() != Some(&now) {
                    on_change(&now);
                }
                if now.is_final() {
                    return Ok(Some(now));
                }
                last = Some(now);
            }
            Ok(_) if failures + 1 >= TRIES => {
                return Err(SlurmError::Unexpected {
                    command: format!("scontrol show job / squeue -j {job_id}"),
                    output: "Slurm no longer knows the job".into(),
                });
            }
            Err(e) if failures + 1 >= TRIES => return Err(e),
            _ => failures += 1,
        }
        std::thread::sleep(poll);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_job_asks_for_no_gpus_and_no_nccl_settings() {
        let mut job = SlurmJob::isambard("cpu", 1, "/tmp/run", "/bin/radit", "/tmp/job.toml");
        job.tasks_per_node = 2;
        job.gpus_per_node = 0;
        let text = render_sbatch(&job);
        assert!(text.contains("#SBATCH --ntasks-per-node=2\n"));
        assert!(!text.contains("--gpus-per-node") && !text.contains("NCCL_"));
    }

    /// Runs the script's plugin check with bash, with and without a plugin on LD_LIBRARY_PATH.
    #[test]
    fn the_libfabric_settings_are_exported_only_when_the_plugin_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let run = |ld_path: &str| {
            let script = format!(
                "set -uo pipefail\n{}echo \"NET=${{NCCL_NET:-unset}} CQ=${{FI_CXI_DEFAULT_CQ_SIZE:-unset}}\"",
                nccl_plugin_block()
            );
            let out = std::process::Command::new("bash")
                .arg("-c")
                .arg(script)
                .env("LD_LIBRARY_PATH", ld_path)
                .env_remove("NCCL_NET")
                .output()
                .unwrap();
            assert!(out.status.success());
            (
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        };
        let (stdout, stderr) = run(&dir.path().display().to_string());
        assert!(stdout.contains("NET=unset CQ=unset"), "{stdout}");
        assert!(stderr.contains("no NCCL libfabric plugin"), "{stderr}");
        let (stdout, _) = run("");
        assert!(stdout.contains("NET=unset"), "{stdout}");
        let plugin = dir.path().join("libnccl-net-ofi.so");
        std::fs::write(&plugin, b"").unwrap();
        let (stdout, stderr) = run(&format!("/nonexistent:{}", dir.path().display()));
        assert!(
            stdout.contains("NET=AWS Libfabric CQ=131072"),
            "{stdout}{stderr}"
        );
        assert!(
            stdout.contains(&format!("plugin {}", plugin.display())),
            "{stdout}"
        );
    }

    #[test]
    fn values_are_shell_quoted() {
        assert_eq!(quote("plain-value_1.0"), "plain-value_1.0");
        assert_eq!(quote("has space"), "'has space'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }
}
