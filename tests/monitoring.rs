//! Monitoring with the real thing: a Prometheus server (Debian's package) scrapes a running job's coordinator with
//! the job token as its bearer credential, and its HTTP API returns the run's series; `promtool check metrics`
//! accepts the exposition; the job pushes to a real Pushgateway and deletes its series when it ends; `radit shard`
//! pushes its ingest progress; the run prints its periodic line and writes preview sheets.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::radit;

fn http_get(addr: &str, path: &str, token: Option<&str>) -> String {
    use std::io::{Read, Write};
    // Not listening yet reads as an empty reply (the callers wait for what they need).
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what} never happened");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A Pushgateway (Debian's prometheus-pushgateway) on a free loopback port, killed on drop.
struct Gateway {
    child: std::process::Child,
    addr: String,
}

impl Gateway {
    fn start(dir: &Path) -> Self {
        let addr = format!("127.0.0.1:{}", common::free_port());
        let child = Command::new("prometheus-pushgateway")
            .arg(format!("--web.listen-address={addr}"))
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus-pushgateway is installed by scripts/setup.sh");
        wait_for("the Pushgateway", 30, || {
            http_get(&addr, "/-/ready", None).contains("OK")
        });
        Self { child, addr }
    }

    /// The pushed series of one job, as lines of the gateway's own exposition.
    fn series(&self, job: &str) -> Vec<String> {
        let label = format!("job=\"{job}\"");
        http_get(&self.addr, "/metrics", None)
            .lines()
            .filter(|l| l.starts_with("radit_") && l.contains(&label))
            .map(str::to_string)
            .collect()
    }

    fn value(&self, job: &str, metric: &str) -> Option<f64> {
        self.series(job)
            .iter()
            .find(|l| l.starts_with(&format!("{metric}{{")))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A 16x16 store (sharded with its progress pushed to `gateway`) and a long-enough job in `dir` that pushes there
/// too and draws a preview sheet every 20 steps.
fn job(dir: &Path, gateway: &str) -> std::path::PathBuf {
    let pushgateway = format!("http://{gateway}");
    let store = common::tiny_store(
        dir,
        48,
        "40x48",
        8,
        &["--pushgateway", &pushgateway, "--push-seconds", "0.2"],
    );
    // The mini-FD's network (a tiny TorchScript one) and its reference: the training split's features, of which the
    // FD picks its first rows by id (the validation split of 48 images is too small for a covariance).
    let net = common::feature_net(dir);
    let reference = dir.join("reference.npy");
    common::run_ok(
        common::radit()
            .args(["eval", "features", "--split", "train", "--input-size", "32"])
            .args(["--device", "cpu", "--store"])
            .arg(&store)
            .arg("--net")
            .arg(&net)
            .arg("--out")
            .arg(&reference),
    );
    let text = format!(
        r#"
[job]
name = "monitored"
run_dir = "run"
[data]
url = "{store}"
window_shards = 2
[model]
preset = "tiny"
[train]
steps = 100000
global_batch = 8
[checkpoint]
url = "{ckpt}"
every = 50
keep = 2
[resources]
cpu_ranks = 2
threads_per_rank = 1
[launcher]
kind = "local"
[restart]
heartbeat_seconds = 0.2
missed_heartbeats = 25
[monitoring]
peak_tflops_per_device = 0.05
progress_seconds = 1.0
pushgateway = "http://{gateway}"
push_seconds = 0.3
[samples]
every = 20
count = 4
steps = 3
[validation]
every = 10
images = 8
batch = 4
times = 2
[validation.fd]
every = 10
samples = 6
steps = 2
split = "train"
reference = "{reference}"
net = "{net}"
input_size = 32
"#,
        store = store.display(),
        ckpt = dir.join("ckpt").display(),
        reference = reference.display(),
        net = net.display(),
    );
    common::write_job(dir, &text)
}

#[test]
fn prometheus_scrapes_a_running_job_and_promtool_accepts_the_exposition() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(dir.path());
    let job = job(dir.path(), &gateway.addr);

    // `radit shard` left its final ingest state on the Pushgateway: all 48 rows done, the store complete.
    assert_eq!(
        gateway.value("radit-shard", "radit_ingest_complete"),
        Some(1.0)
    );
    assert_eq!(
        gateway.value("radit-shard", "radit_ingest_rows"),
        Some(48.0)
    );
    assert_eq!(
        gateway.value("radit-shard", "radit_ingest_rows_done"),
        Some(48.0)
    );
    assert_eq!(
        gateway.value("radit-shard", "radit_ingest_progress_ratio"),
        Some(1.0)
    );
    assert!(
        gateway
            .value("radit-shard", "radit_ingest_shards_written_total")
            .is_some_and(|v| v >= 6.0)
            && gateway
                .value("radit-shard", "radit_ingest_bytes_written_total")
                .is_some_and(|v| v > 0.0),
        "{:?}",
        gateway.series("radit-shard")
    );

    let stderr_path = dir.path().join("run.stderr");
    let mut run = radit()
        .arg("run")
        .arg(&job)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let run_dir = dir.path().join("run");
    wait_for("the coordinator", 60, || {
        run_dir.join("coordinator.addr").exists()
    });
    let addr = std::fs::read_to_string(run_dir.join("coordinator.addr")).unwrap();
    let token = std::fs::read_to_string(run_dir.join("job.token")).unwrap();

    // promtool on what /metrics serves (and nothing without the token).
    wait_for("a few steps", 120, || {
        http_get(&addr, "/metrics", Some(&token)).contains("radit_step_seconds_median")
    });
    // Nothing without the token: a 401, not merely an empty reply.
    let refused = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(
        refused.starts_with("HTTP/1.1 401") && !refused.contains("radit_step"),
        "{refused}"
    );
    let exposition = http_get(&addr, "/metrics", Some(&token));
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by scripts/setup.sh");
    std::io::Write::write_all(check.stdin.as_mut().unwrap(), exposition.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus scrapes it with the job token as its bearer credential.
    let port = common::free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: radit\n    authorization:\n      \
             type: Bearer\n      credentials_file: {}\n    file_sd_configs:\n      - files: ['{}']\n  \
             - job_name: pushgateway\n    honor_labels: true\n    static_configs:\n      - targets: ['{}']\n",
            run_dir.join("job.token").display(),
            run_dir.join("prometheus-targets.json").display(),
            gateway.addr
        ),
    )
    .unwrap();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let api = format!("127.0.0.1:{port}");
    let query = |q: &str| -> serde_json::Value {
        let body = http_get(&api, &format!("/api/v1/query?query={q}"), None);
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
    };
    let value = |v: &serde_json::Value| -> Option<f64> {
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    // The job's own scrape (Prometheus also scrapes the Pushgateway, where the job's series arrive under
    // job="monitored").
    let direct = |metric: &str| query(&format!("{metric}{{job=\"radit\"}}"));
    wait_for("Prometheus to scrape the run", 60, || {
        value(&direct("radit_step")).is_some_and(|s| s > 0.0)
    });
    assert_eq!(value(&direct("radit_ranks_joined")), Some(2.0));
    assert_eq!(value(&direct("radit_world_size")), Some(2.0));
    assert_eq!(
        value(&query("sum(radit_rank_alive{job=\"radit\"})")),
        Some(2.0)
    );
    let up = query("up{job=\"radit\"}");
    assert_eq!(value(&up), Some(1.0), "{up}");
    // What the ranks report through their heartbeats: throughput, loss, step time per rank, MFU's parts.
    wait_for("training counters", 60, || {
        value(&direct("radit_images_total")).is_some_and(|v| v > 0.0)
    });
    for q in [
        "radit_tokens_total",
        "radit_model_flops_total",
        "radit_loss",
        "radit_grad_norm",
        "radit_learning_rate",
        "radit_progress_ratio",
        "radit_peak_flops_per_second",
    ] {
        assert!(
            value(&direct(q)).is_some_and(f64::is_finite),
            "{q}: {}",
            direct(q)
        );
    }
    let per_rank = direct("radit_step_duration_seconds_count");
    assert_eq!(
        per_rank["data"]["result"].as_array().map(Vec::len),
        Some(2),
        "one step-time histogram per rank: {per_rank}"
    );
    // A committed checkpoint: its bytes, write and save durations.
    wait_for("a committed checkpoint in the metrics", 120, || {
        value(&direct("radit_checkpoint_bytes_total")).is_some_and(|v| v > 0.0)
    });
    for q in [
        "radit_checkpoint_write_seconds",
        "radit_checkpoint_save_seconds",
        "radit_loss_max",
        "radit_mfu_ratio",
    ] {
        assert!(
            value(&direct(q)).is_some_and(|v| v.is_finite() && v > 0.0),
            "{q}: {}",
            direct(q)
        );
    }
    // Both from the same step of the same rank (one query, so one scrape): the largest rank loss is at least their
    // mean, the global loss.
    let gap = query("radit_loss_max{job=\"radit\"}-radit_loss{job=\"radit\"}");
    assert!(value(&gap).is_some_and(|g| g >= -1e-9), "{gap}");
    // Evaluation during training: the validation loss and the mini-FD against the reference features.
    wait_for("the validation loss and mini-FD", 120, || {
        value(&direct("radit_val_loss")).is_some_and(|v| v.is_finite() && v > 0.0)
            && value(&direct("radit_fd")).is_some_and(|v| v.is_finite() && v >= 0.0)
    });

    // The same series reach the Pushgateway, under the job's name.
    wait_for("the job's series on the Pushgateway", 30, || {
        gateway
            .value("monitored", "radit_images_total")
            .is_some_and(|v| v > 0.0)
    });

    // The dashboard: every metric it names is one this run exported (the coordinator's /metrics and `radit
    // shard`'s pushed series), or one of the GPU ranks' series, which the coordinator's golden exposition pins to
    // its code (coordinator/tests/golden/metrics.txt); and everything exported is in the registry of radit's
    // metrics (radit_monitoring::metrics). Every query is valid PromQL that Prometheus answers for this job.
    let registered: std::collections::BTreeSet<String> = radit_monitoring::metrics::series_names()
        .into_iter()
        .collect();
    let metric_names: std::collections::BTreeSet<&str> =
        radit_monitoring::metrics::names().into_iter().collect();
    let exposition = http_get(&addr, "/metrics", Some(&token));
    // A `# TYPE` line names a metric (a histogram's base name); a pushed series is a series name.
    for name in exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
    {
        assert!(
            metric_names.contains(name),
            "{name} is exported but not in radit_monitoring::metrics"
        );
    }
    let pushed = gateway.series("radit-shard");
    for series in &pushed {
        let name = series.split([' ', '{']).next().unwrap_or_default();
        assert!(
            registered.contains(name),
            "{name} is pushed but not in radit_monitoring::metrics"
        );
    }
    let golden =
        std::fs::read_to_string(common::repo().join("coordinator/tests/golden/metrics.txt"))
            .unwrap();
    let gpu_only = [
        radit_monitoring::metrics::GPU_MEMORY_USED.name,
        radit_monitoring::metrics::GPU_MEMORY_TOTAL.name,
    ];
    let series_name = |line: &str| -> Option<String> {
        let name = line.split([' ', '{']).next()?;
        (!line.starts_with('#') && name.starts_with("radit_")).then(|| name.to_string())
    };
    let mut exported: std::collections::BTreeSet<String> = exposition
        .lines()
        .chain(pushed.iter().map(String::as_str))
        .filter_map(series_name)
        .collect();
    for name in gpu_only {
        assert!(
            golden.lines().filter_map(series_name).any(|n| n == name),
            "{name} is not in the coordinator's golden exposition"
        );
        exported.insert(name.to_string());
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo().join("monitoring/grafana/radit-dashboard.json"))
            .unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("radit_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    exported.contains(&name),
                    "panel {:?} queries {name}, which this run did not export",
                    panel["title"]
                );
                rest = &rest[at + name.len()..];
            }
            let q = expr.replace("$job", "radit");
            let encoded: String = q
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            // Every query has data for this job, except the GPU panel's on CPU ranks.
            let mut answer = query(&encoded);
            if !gpu_only.iter().any(|m| q.contains(m)) {
                let has_data = |a: &serde_json::Value| {
                    a["data"]["result"]
                        .as_array()
                        .is_some_and(|r| !r.is_empty())
                };
                // rate() and increase() need two scrapes in their window.
                wait_for(&format!("data for `{q}`"), 20, || {
                    answer = query(&encoded);
                    has_data(&answer)
                });
            }
            assert_eq!(answer["status"], "success", "{q}: {answer}");
        }
    }

    let _ = prometheus.kill();
    let _ = prometheus.wait();
    // SAFETY: kill(2) on the `radit run` this test started; SIGTERM makes it checkpoint and exit 75.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(75));

    // The job's series left the Pushgateway with it; the ingest's final state stays.
    assert_eq!(gateway.series("monitored"), Vec::<String>::new());
    assert_eq!(
        gateway.value("radit-shard", "radit_ingest_complete"),
        Some(1.0)
    );

    // The periodic line a person reads, with throughput, MFU and ETA.
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    // The last one: the first lines come before the step-time median an ETA needs.
    let line = stderr
        .lines()
        .rfind(|l| l.starts_with("radit: step ") && l.contains("img/s"))
        .unwrap_or_else(|| panic!("no periodic line with rates in:\n{stderr}"));
    for part in [
        " loss ",
        "(max ",
        " img/s ",
        " tok/s ",
        " MFU ",
        " s/step ETA ",
        "[generation 1]",
    ] {
        assert!(line.contains(part), "`{part}` missing from `{line}`");
    }

    // The job token, and the TCP group's secret derived from it, appear in no output: not the supervisor's
    // stderr, not /metrics, not any file of the run directory (rank logs, rank configs, the Prometheus targets)
    // but the 0600 token file itself.
    let secrets = [
        token.trim().to_string(),
        hex::encode(radit_engine::collective::tcp::group_secret(token.trim())),
    ];
    let mut files = vec![run_dir.clone()];
    let mut scanned = 0;
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if path.file_name().is_some_and(|n| n == "job.token") {
            continue;
        }
        let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{} holds the job's secret",
                path.display()
            );
        }
        scanned += 1;
    }
    assert!(scanned > 5, "scanned only {scanned} files");
    for (what, text) in [("stderr", &stderr), ("/metrics", &exposition)] {
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{what} holds the job's secret"
            );
        }
    }

    // Preview sheets every 20 steps from the EMA weights, the newest also as latest.png.
    let sheets = run_dir.join("samples").join("progress");
    let first = sheets.join("step-00000020.png");
    let png = std::fs::read(&first).unwrap_or_else(|e| panic!("{}: {e}", first.display()));
    let info = png::Decoder::new(std::io::Cursor::new(&png))
        .read_info()
        .unwrap()
        .info()
        .clone();
    // 4 tiles of 16 pixels in a 2 x 2 grid, each enlarged 16x (to 256) so the sheet is at least 512 wide, with
    // 4-pixel gaps, a two-line title (24) and three caption lines (32) under each row.
    assert_eq!(
        (info.width, info.height),
        (2 * 256 + 3 * 4, 24 + 2 * (256 + 32) + 3 * 4)
    );
    assert!(sheets.join("latest.png").exists());
    assert!(
        std::fs::read_dir(&sheets).unwrap().count() >= 3,
        "sheets at steps 20, 40, ... and latest.png"
    );
}
