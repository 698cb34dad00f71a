//! The coordinator over real TCP on 127.0.0.1: rendezvous, token checks, body limits, malformed requests,
//! heartbeat failure detection, the checkpoint catalogue and a clean shutdown.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use radit_coordinator::{Coordinator, CoordinatorConfig, JobHealth};
use radit_protocol::{
    ClientError, CoordinatorClient, Heartbeat, HeartbeatReply, JobToken, JoinReply, JoinRequest,
    Phase, RankStats, STEP_SECONDS_BUCKETS,
};

fn join(c: &CoordinatorClient, host: &str, pid: u32) -> Result<JoinReply, ClientError> {
    c.join(&JoinRequest {
        host: host.into(),
        pid,
        rank: None,
        endpoint: None,
    })
}

fn beat(
    c: &CoordinatorClient,
    rank: usize,
    generation: u64,
    step: u64,
    phase: Phase,
) -> Result<HeartbeatReply, ClientError> {
    c.heartbeat(&Heartbeat {
        rank,
        generation,
        step,
        done: false,
        stats: None,
        phase: Some(phase),
        fatal: None,
    })
}

struct Service {
    addr: SocketAddr,
    coordinator: Arc<Coordinator>,
    token: JobToken,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Service {
    fn start(cfg: CoordinatorConfig) -> Self {
        let token = JobToken::generate().unwrap();
        let coordinator = Coordinator::new(cfg, token.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let c = coordinator.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                addr_tx.send(listener.local_addr()?).ok();
                radit_coordinator::serve(listener, c, async move {
                    let _ = rx.await;
                })
                .await
            })
        });
        let addr = addr_rx.recv().unwrap();
        Self {
            addr,
            coordinator,
            token,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    fn client(&self) -> CoordinatorClient {
        CoordinatorClient::new(self.addr, self.token.clone())
    }

    /// A raw request, for what the client would never send.
    fn raw(&self, request: &str) -> String {
        let mut s = std::net::TcpStream::connect(self.addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    fn shutdown(mut self) -> std::io::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap()
    }
}

fn post(path: &str, token: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn status_code(reply: &str) -> u16 {
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn ranks_rendezvous_and_learn_their_rank_world_and_peers() {
    let svc = Service::start(CoordinatorConfig::new(3));
    let joins: Vec<_> = (0..3)
        .map(|i| {
            let c = svc.client();
            std::thread::spawn(move || join(&c, &format!("node{i}"), 100 + i).unwrap())
        })
        .collect();
    let mut replies: Vec<_> = joins.into_iter().map(|j| j.join().unwrap()).collect();
    replies.sort_by_key(|r| r.rank);
    assert_eq!(
        replies.iter().map(|r| r.rank).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    for r in &replies {
        assert_eq!((r.world, r.generation), (3, 0));
        assert_eq!(r.peers, replies[0].peers);
    }
    assert_eq!(svc.coordinator.health(), JobHealth::Running);
    // A fourth rank is refused.
    let err = join(&svc.client(), "node9", 9).unwrap_err();
    assert!(
        matches!(err, ClientError::Refused { status: 409, .. }),
        "{err}"
    );
    svc.shutdown().unwrap();
}

#[test]
fn requests_without_the_token_oversized_or_malformed_change_nothing() {
    let mut cfg = CoordinatorConfig::new(2);
    cfg.max_body_bytes = 1024;
    let svc = Service::start(cfg);
    let good = svc.token.secret().to_string();
    let join = r#"{"host":"a","pid":1}"#;
    assert_eq!(status_code(&svc.raw(&post("/v1/join", "0000", join))), 401);
    let no_token = format!(
        "POST /v1/join HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{join}",
        join.len()
    );
    assert_eq!(status_code(&svc.raw(&no_token)), 401);
    assert_eq!(
        status_code(&svc.raw(&post("/v1/status", &good, ""))),
        405,
        "status is GET"
    );
    let big = format!(r#"{{"host":"{}","pid":1}}"#, "x".repeat(4096));
    assert_eq!(status_code(&svc.raw(&post("/v1/join", &good, &big))), 413);
    let malformed = svc.raw(&post("/v1/join", &good, r#"{"host": "a", "pid": "#));
    assert!((400..500).contains(&status_code(&malformed)), "{malformed}");
    let unknown = svc.raw(&post("/v1/join", &good, r#"{"host":"a","pid":1,"rnak":0}"#));
    assert!((400..500).contains(&status_code(&unknown)), "{unknown}");
    let wrong_token_client = CoordinatorClient::new(svc.addr, JobToken::generate().unwrap());
    assert!(matches!(
        wrong_token_client.status(),
        Err(ClientError::Refused { status: 401, .. })
    ));
    // None of it joined anyone.
    assert_eq!(
        svc.coordinator.health(),
        JobHealth::Forming {
            joined: 0,
            world: 2
        }
    );
    assert!(
        !svc.raw(&post("/v1/join", "0000", join)).contains(&good),
        "the token is never echoed"
    );
    svc.shutdown().unwrap();
}

#[test]
fn a_rank_that_stops_heart_beating_is_named_dead() {
    let mut cfg = CoordinatorConfig::new(2);
    cfg.heartbeat_interval = Duration::from_millis(100);
    let svc = Service::start(cfg);
    let (a, b) = (svc.client(), svc.client());
    let ja = std::thread::spawn(move || join(&a, "n0", 1).unwrap());
    let rb = join(&b, "n1", 2).unwrap();
    let ra = ja.join().unwrap();
    let client = svc.client();
    // Both beat for a while; then only rank `ra.rank` keeps beating.
    for step in 0..3 {
        beat(&client, ra.rank, 0, step, Phase::Compute).unwrap();
        beat(&client, rb.rank, 0, step, Phase::Compute).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(svc.coordinator.health(), JobHealth::Running);
    for step in 3..12 {
        beat(&client, ra.rank, 0, step, Phase::Compute).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    match svc.coordinator.health() {
        JobHealth::RankDead { rank, silent_ms } => {
            assert_eq!(rank, rb.rank);
            assert!(silent_ms > 300, "{silent_ms}");
        }
        other => panic!("expected a dead rank, got {other:?}"),
    }
    let ranks = svc.coordinator.ranks();
    assert!(ranks[ra.rank].alive && !ranks[rb.rank].alive);
    assert_eq!(ranks[ra.rank].step, 11);
    // The next generation forgets the old ranks; their heartbeats are refused, as superseded.
    assert_eq!(svc.coordinator.new_generation(), 1);
    assert!(matches!(
        beat(&client, ra.rank, 0, 12, Phase::Compute),
        Err(ClientError::Superseded { .. })
    ));
    svc.shutdown().unwrap();
}

#[test]
fn checkpoints_are_catalogued_in_order_and_stop_requests_reach_the_ranks() {
    let svc = Service::start(CoordinatorConfig::new(1));
    let c = svc.client();
    let r = join(&c, "n0", 1).unwrap();
    c.report_checkpoint(100).unwrap();
    c.report_checkpoint(200).unwrap();
    assert!(matches!(
        c.report_checkpoint(150),
        Err(ClientError::Refused { status: 409, .. })
    ));
    assert_eq!(svc.coordinator.checkpoints(), [100, 200]);
    assert!(!beat(&c, r.rank, 0, 1, Phase::Compute).unwrap().stop);
    svc.coordinator.request_stop();
    assert!(beat(&c, r.rank, 0, 2, Phase::Compute).unwrap().stop);
    let status = c.status().unwrap();
    assert_eq!(status["checkpoints"], serde_json::json!([100, 200]));
    svc.shutdown().unwrap();
}

#[test]
fn shutdown_drains_even_with_a_rank_waiting_to_join() {
    let svc = Service::start(CoordinatorConfig::new(2));
    let c = svc.client();
    let waiting = std::thread::spawn(move || join(&c, "n0", 1));
    std::thread::sleep(Duration::from_millis(200));
    let started = std::time::Instant::now();
    svc.shutdown().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the drain did not wait for the join timeout"
    );
    let err = waiting.join().unwrap().unwrap_err();
    assert!(
        matches!(err, ClientError::Refused { status: 503, .. }),
        "{err}"
    );
}

#[test]
fn launcher_ranks_are_kept_and_endpoints_become_the_peers() {
    let svc = Service::start(CoordinatorConfig::new(2));
    let c = svc.client();
    let req = |rank, endpoint: &str| JoinRequest {
        host: "n".into(),
        pid: 1,
        rank: Some(rank),
        endpoint: Some(endpoint.into()),
    };
    let c1 = c.clone();
    let r1 = std::thread::spawn(move || c1.join(&req(1, "10.0.0.2:7000")).unwrap());
    std::thread::sleep(Duration::from_millis(100));
    assert!(matches!(
        c.join(&req(1, "x")),
        Err(ClientError::Refused { status: 409, .. })
    ));
    assert!(matches!(
        c.join(&req(5, "x")),
        Err(ClientError::Refused { status: 400, .. })
    ));
    let r0 = c.join(&req(0, "10.0.0.1:7000")).unwrap();
    let r1 = r1.join().unwrap();
    assert_eq!((r0.rank, r1.rank), (0, 1));
    assert_eq!(r0.peers, ["10.0.0.1:7000", "10.0.0.2:7000"]);
    svc.shutdown().unwrap();
}

#[test]
fn a_hang_is_detected_from_the_median_step_time_and_the_culprit_named() {
    let mut cfg = CoordinatorConfig::new(3);
    cfg.hang_factor = 4.0;
    cfg.hang_min = Duration::from_millis(200);
    let svc = Service::start(cfg);
    let c = svc.client();
    let joins: Vec<_> = (0..3)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || join(&c, "n", i).unwrap())
        })
        .collect();
    let ranks: Vec<usize> = joins.into_iter().map(|j| j.join().unwrap().rank).collect();
    // Ten steps of about 30 ms each.
    for step in 1..=10 {
        std::thread::sleep(Duration::from_millis(30));
        for &r in &ranks {
            beat(&c, r, 0, step, Phase::Compute).unwrap();
        }
    }
    assert_eq!(svc.coordinator.health(), JobHealth::Running);
    // Rank 1 stops making progress in compute; the others wait for it in a collective, all still beating.
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(30));
        beat(&c, 0, 0, 10, Phase::Collective).unwrap();
        beat(&c, 1, 0, 10, Phase::Compute).unwrap();
        beat(&c, 2, 0, 10, Phase::Collective).unwrap();
    }
    match svc.coordinator.health() {
        JobHealth::Hung {
            culprit,
            phase,
            step,
            deadline_ms,
            ..
        } => {
            assert_eq!((culprit, phase, step), (1, Phase::Compute, 10));
            assert_eq!(deadline_ms, 200, "max(hang_min, 4 x ~30 ms)");
        }
        other => panic!("expected a hang, got {other:?}"),
    }
    let metrics = svc.coordinator.metrics();
    assert!(
        metrics.contains("radit_rank_hung{rank=\"1\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("radit_rank_hung{rank=\"0\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("radit_step 10"), "{metrics}");
    // /metrics is behind the token too.
    let reply = svc.raw("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(status_code(&reply), 401);
    let reply = svc.raw(&format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        svc.token.secret()
    ));
    assert!(reply.contains("radit_rank_hung{rank=\"1\"} 1"), "{reply}");
    svc.shutdown().unwrap();
}

#[test]
fn an_error_a_restart_would_repeat_is_kept_from_the_first_rank_that_reports_it() {
    let svc = Service::start(CoordinatorConfig::new(2));
    let c = svc.client();
    let c1 = c.clone();
    let other = std::thread::spawn(move || join(&c1, "n1", 2).unwrap());
    let r0 = join(&c, "n0", 1).unwrap();
    let r1 = other.join().unwrap();
    beat(&c, r0.rank, 0, 4, Phase::Compute).unwrap();
    assert_eq!(svc.coordinator.fatal(), None);
    let fatal = |rank: usize, why: &str| {
        c.heartbeat(&Heartbeat {
            rank,
            generation: 0,
            step: 4,
            phase: Some(Phase::Compute),
            done: false,
            stats: None,
            fatal: Some(why.into()),
        })
        .unwrap()
    };
    fatal(r1.rank, "out of memory in step 5");
    fatal(r0.rank, "out of memory in step 5, too");
    assert_eq!(
        svc.coordinator.fatal(),
        Some((r1.rank, "out of memory in step 5".to_string()))
    );
    svc.shutdown().unwrap();
}

#[test]
fn a_rank_that_said_goodbye_is_not_dead_and_the_run_is_not_hung() {
    let mut cfg = CoordinatorConfig::new(2);
    cfg.heartbeat_interval = Duration::from_millis(50);
    cfg.hang_min = Duration::from_millis(100);
    cfg.hang_startup = Duration::from_millis(100);
    let svc = Service::start(cfg);
    let c = svc.client();
    let c1 = c.clone();
    let other = std::thread::spawn(move || join(&c1, "n1", 2).unwrap());
    let r0 = join(&c, "n0", 1).unwrap();
    let r1 = other.join().unwrap();
    beat(&c, r0.rank, 0, 60, Phase::Compute).unwrap();
    c.heartbeat(&Heartbeat {
        rank: r1.rank,
        generation: 0,
        step: 60,
        phase: Some(Phase::Checkpoint),
        done: true,
        stats: None,
        fatal: None,
    })
    .unwrap();
    assert_eq!(
        svc.coordinator.all_departed(),
        None,
        "rank 0 is still running"
    );
    // Rank 1 is silent from now on; rank 0 keeps beating while it finishes.
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(50));
        beat(&c, r0.rank, 0, 60, Phase::Checkpoint).unwrap();
    }
    assert_eq!(svc.coordinator.health(), JobHealth::Running);
    c.heartbeat(&Heartbeat {
        rank: r0.rank,
        generation: 0,
        step: 60,
        phase: None,
        done: true,
        stats: None,
        fatal: None,
    })
    .unwrap();
    assert_eq!(svc.coordinator.all_departed(), Some(60));
    svc.shutdown().unwrap();
}

fn stats(images: u64, loss_max: f64, gpu: Option<(u64, u64)>) -> RankStats {
    RankStats {
        steps: images / 4,
        images,
        tokens: images * 16,
        model_flops: images as f64 * 1e6,
        // One step under 0.1 s, the rest under 1 s.
        step_seconds_buckets: STEP_SECONDS_BUCKETS
            .iter()
            .map(|&b| match b {
                b if b >= 1.0 => images / 4,
                b if b >= 0.1 => 1,
                _ => 0,
            })
            .collect(),
        step_seconds_count: images / 4,
        step_seconds_sum: 0.5 * (images / 4) as f64,
        loss: 0.6,
        loss_max,
        checkpoint_bytes: 1000,
        // The same on every rank: the run's count, not the sum.
        skipped_steps: 2,
        checkpoints: 3,
        checkpoint_write_seconds: 0.25,
        checkpoint_save_seconds: 0.5,
        device_memory_used_bytes: gpu.map_or(0, |g| g.0),
        device_memory_total_bytes: gpu.map_or(0, |g| g.1),
        ..Default::default()
    }
}

fn beat_stats(c: &CoordinatorClient, rank: usize, generation: u64, s: RankStats) {
    c.heartbeat(&Heartbeat {
        rank,
        generation,
        step: s.steps,
        done: false,
        stats: Some(s),
        phase: Some(Phase::Compute),
        fatal: None,
    })
    .unwrap();
}

#[test]
fn rank_counters_add_up_across_ranks_and_generations_and_gpu_memory_is_per_rank() {
    let svc = Service::start(CoordinatorConfig::new(2));
    let ranks = |generation: u64| -> Vec<(usize, CoordinatorClient)> {
        let joins: Vec<_> = (0..2)
            .map(|i| {
                let c = svc.client();
                std::thread::spawn(move || {
                    let r = join(&c, &format!("node{i}"), 100 + i).unwrap();
                    assert_eq!(r.generation, generation);
                    (r.rank, c)
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    };
    for (rank, c) in ranks(0) {
        let gpu = (rank == 1).then_some((30 << 30, 96 << 30));
        beat_stats(&c, rank, 0, stats(40, 0.7, gpu));
    }
    let m = svc.coordinator.metrics();
    for line in [
        "radit_images_total 80",
        "radit_tokens_total 1280",
        "radit_loss 0.6",
        "radit_loss_max 0.7",
        "radit_checkpoint_bytes_total 2000",
        "radit_skipped_steps_total 2",
        "radit_checkpoints_total 3",
        "radit_checkpoint_write_seconds 0.25",
        "radit_checkpoint_save_seconds 0.5",
        // Only the GPU rank has memory to show.
        "radit_gpu_memory_used_bytes{rank=\"1\"} 32212254720",
        "radit_gpu_memory_total_bytes{rank=\"1\"} 103079215104",
        "radit_step_duration_seconds_bucket{rank=\"0\",le=\"1\"} 10",
        "radit_step_duration_seconds_count{rank=\"1\"} 10",
    ] {
        assert!(m.lines().any(|l| l == line), "`{line}` missing from\n{m}");
    }
    assert!(
        !m.contains("radit_gpu_memory_used_bytes{rank=\"0\"}"),
        "{m}"
    );
    let t = svc.coordinator.totals().expect("ranks reported");
    assert_eq!(
        (t.images, t.tokens, t.loss, t.loss_max),
        (80.0, 1280.0, 0.6, 0.7)
    );

    // Relaunched ranks count from zero; the job's totals keep what the first generation did.
    assert_eq!(svc.coordinator.new_generation(), 1);
    // Before the new ranks report, the counters keep what was done (a scrape now must not see them vanish).
    let m = svc.coordinator.metrics();
    for line in ["radit_images_total 80", "radit_skipped_steps_total 2"] {
        assert!(m.lines().any(|l| l == line), "`{line}` missing from\n{m}");
    }
    let t = svc.coordinator.totals().expect("earlier generations count");
    assert!(t.images == 80.0 && t.loss.is_nan(), "{t:?}");
    for (rank, c) in ranks(1) {
        beat_stats(&c, rank, 1, stats(8, 0.4, None));
    }
    let m = svc.coordinator.metrics();
    for line in [
        "radit_images_total 96",
        "radit_checkpoint_bytes_total 4000",
        "radit_skipped_steps_total 4",
        "radit_checkpoints_total 6",
        "radit_loss_max 0.4",
    ] {
        assert!(m.lines().any(|l| l == line), "`{line}` missing from\n{m}");
    }
    assert!(!m.contains("radit_gpu_memory"), "{m}");
    svc.shutdown().unwrap();
}

#[test]
fn a_heartbeat_with_a_malformed_histogram_is_refused() {
    let svc = Service::start(CoordinatorConfig::new(1));
    let c = svc.client();
    let rank = join(&c, "node0", 1).unwrap().rank;
    // The bucket bounds are the protocol's: a heartbeat with a count more or less is refused.
    let mut one_more = stats(4, 0.5, None);
    one_more.step_seconds_buckets.push(5);
    let mut one_less = stats(4, 0.5, None);
    one_less.step_seconds_buckets.pop();
    let mut none = stats(4, 0.5, None);
    none.step_seconds_buckets.clear();
    for bad in [one_more, one_less, none] {
        let err = c
            .heartbeat(&Heartbeat {
                rank,
                generation: 0,
                step: 1,
                done: false,
                stats: Some(bad),
                phase: None,
                fatal: None,
            })
            .unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Refused {
                    status: 400 | 422,
                    ..
                }
            ),
            "{err}"
        );
    }
    assert!(svc.coordinator.totals().is_none());
    svc.shutdown().unwrap();
}

#[test]
fn a_compact_heartbeat_moves_the_step_and_a_malformed_one_is_refused_by_name() {
    let svc = Service::start(CoordinatorConfig::new(1));
    let c = svc.client();
    let rank = join(&c, "node0", 1).unwrap().rank;
    // The client sends a beat without counters in its 23-byte form.
    let beat = Heartbeat {
        rank,
        generation: 0,
        step: 7,
        phase: Some(Phase::Collective),
        ..Heartbeat::default()
    };
    let compact = beat.to_compact().unwrap();
    assert!(!c.heartbeat(&beat).unwrap().stop);
    let seen = &svc.coordinator.ranks()[0];
    assert_eq!((seen.step, seen.phase), (7, Phase::Collective));
    // Wrong version, short, and an unknown phase: each refused with its reason; the rank stays at step 7.
    let token = svc.token.secret().to_string();
    let mut v9 = compact;
    v9[0] = 9;
    let mut odd_phase = compact;
    odd_phase[2] = 77;
    for (bytes, why) in [
        (&v9[..], "version 9"),
        (&compact[..20], "this one 20"),
        (&odd_phase[..], "phase 77"),
    ] {
        let head = format!(
            "POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            radit_protocol::COMPACT_BEAT_CONTENT_TYPE,
            bytes.len()
        );
        let request = head + std::str::from_utf8(bytes).unwrap();
        let reply = svc.raw(&request);
        assert_eq!(status_code(&reply), 400, "{reply}");
        assert!(reply.contains(why), "{why}: {reply}");
    }
    assert_eq!(svc.coordinator.ranks()[0].step, 7);
    svc.shutdown().unwrap();
}

#[test]
fn over_tls_only_a_client_pinned_to_the_jobs_authority_with_the_token_gets_in() {
    use radit_coordinator::tls::JobPki;
    use radit_protocol::PinnedAuthority;
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.0.0.1".parse().unwrap();
    let pki = JobPki::generate(ip, None).unwrap();
    assert!(
        !pki.ca_pem.contains("PRIVATE KEY"),
        "only the certificate leaves"
    );
    let ca = dir.path().join("coordinator-ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let token = JobToken::generate().unwrap();
    let svc = radit_coordinator::Service::start_with(
        "127.0.0.1:0",
        CoordinatorConfig::new(1),
        token.clone(),
        Some(&pki),
    )
    .unwrap();
    let pinned = PinnedAuthority::read(&ca, &pki.ca_sha256).unwrap();

    // The job's own client: HTTPS, trusting this authority only.
    let client = CoordinatorClient::new(svc.addr, token.clone()).with_authority(pinned.clone());
    let reply = join(&client, "node0", 1).unwrap();
    assert_eq!((reply.rank, reply.world), (0, 1));
    assert!(client.clone().status().is_ok(), "a clone keeps the pinning");

    // Pinned to another job's authority: the handshake fails, nothing is sent.
    let other = JobPki::generate(ip, None).unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, &other.ca_pem).unwrap();
    let stranger = CoordinatorClient::new(svc.addr, token.clone())
        .with_authority(PinnedAuthority::read(&other_ca, &other.ca_sha256).unwrap());
    match stranger.status() {
        Err(ClientError::Unreachable { .. }) => {}
        other => panic!("a client of another job's authority: {other:?}"),
    }
    // The right authority with a wrong token: TLS works, the token does not.
    let wrong_token =
        CoordinatorClient::new(svc.addr, JobToken::generate().unwrap()).with_authority(pinned);
    assert!(matches!(
        wrong_token.status(),
        Err(ClientError::Refused { status: 401, .. })
    ));
    // Plain HTTP gets no answer from an HTTPS coordinator.
    assert!(CoordinatorClient::new(svc.addr, token).status().is_err());
    // An authority file that is not the pinned one is refused before any connection.
    match PinnedAuthority::read(&other_ca, &pki.ca_sha256) {
        Err(ClientError::Authority { reason, .. }) => {
            assert!(reason.contains("not the"), "{reason}")
        }
        other => panic!("a replaced authority file: {other:?}"),
    }
}
