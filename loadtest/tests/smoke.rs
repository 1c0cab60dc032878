//! The `smoke` scenario end to end: a real `switchboard standalone` process on free
//! loopback ports with its data in a temporary directory, and the harness's own
//! binary running `run loadtest/scenarios/smoke.toml`. The test reads the written
//! report and asserts that every delivery was checked and the thresholds held, then
//! merges the agent's raw file into the same report.
//!
//! The server binary comes from another package, so it is not built for this test:
//! `cargo build -p switchboard` must have run first (the test command does).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// HS256 secret shared by the server and the harness in this test.
const SECRET: &str = "load-smoke-test-secret-load-smoke-test-0123";

/// Longest the harness may take (the scenario runs about 10 s).
const RUN_LIMIT: Duration = Duration::from_secs(120);

fn server_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/switchboard");
    assert!(
        path.exists(),
        "{} is missing: build the server first with `cargo build -p switchboard` \
         (scripts/test-all.sh does before `cargo test`)",
        path.display()
    );
    path
}

/// A free loopback port (bound then released; the race with other processes is
/// acceptable in tests).
/// A free loopback port below Linux's ephemeral range (32768-60999), so that no
/// outgoing connection of the harness can take it between the check and the server's
/// bind; a counter keeps this process's choices distinct.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = (std::process::id() % 40) * 300;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = (FIRST + (offset + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {FIRST} and {}", FIRST + SPAN)
}

/// A running standalone server; killed on drop.
struct Server {
    child: Child,
    log: PathBuf,
    gateway: u16,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let ports: Vec<u16> = (0..9).map(|_| free_port()).collect();
        let at = |i: usize| format!("127.0.0.1:{}", ports[i]);
        let env = [
            (
                "SWITCHBOARD_DATA_DIR",
                dir.join("data").display().to_string(),
            ),
            ("SWITCHBOARD_AUTH__HS256_SECRET", SECRET.to_owned()),
            ("SWITCHBOARD_DEV_MODE", "false".to_owned()),
            ("SWITCHBOARD_LOG__LEVEL", "warn".to_owned()),
            ("SWITCHBOARD_GATEWAY__LISTEN", at(0)),
            ("SWITCHBOARD_GATEWAY__GRPC_LISTEN", at(1)),
            ("SWITCHBOARD_GATEWAY__ADMIN_LISTEN", at(2)),
            ("SWITCHBOARD_PRESENCE__GRPC_LISTEN", at(3)),
            ("SWITCHBOARD_PRESENCE__ADMIN_LISTEN", at(4)),
            ("SWITCHBOARD_ROUTING__GRPC_LISTEN", at(5)),
            ("SWITCHBOARD_ROUTING__ADMIN_LISTEN", at(6)),
            ("SWITCHBOARD_STORAGE__GRPC_LISTEN", at(7)),
            ("SWITCHBOARD_STORAGE__ADMIN_LISTEN", at(8)),
            (
                "SWITCHBOARD_CLUSTER__PRESENCE_URL",
                format!("http://{}", at(3)),
            ),
            (
                "SWITCHBOARD_CLUSTER__ROUTING_URL",
                format!("http://{}", at(5)),
            ),
            (
                "SWITCHBOARD_CLUSTER__STORAGE_URL",
                format!("http://{}", at(7)),
            ),
        ];
        std::fs::create_dir_all(dir.join("data")).expect("data directory");
        let log = dir.join("standalone.log");
        let file = std::fs::File::create(&log).expect("server log");
        // Only the server's own settings: it refuses unknown SWITCHBOARD_* variables.
        let child = Command::new(server_binary())
            .arg("standalone")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file)
            .spawn()
            .expect("spawn switchboard standalone");
        let server = Server {
            child,
            log,
            gateway: ports[0],
        };
        server.wait_ready(ports[2]);
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&self, admin: u16) {
        use std::io::{Read as _, Write as _};
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", admin)) {
                let _ = s.write_all(
                    b"GET /readyz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n",
                );
                let mut reply = String::new();
                let _ = s.read_to_string(&mut reply);
                if reply.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("standalone not ready after 30 s; log:\n{}", self.log());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run the harness binary with `args`, bounded by [`RUN_LIMIT`]; returns its exit
/// code and output.
fn harness(args: &[&str]) -> (Option<i32>, String) {
    let out_dir = tempfile::tempdir().expect("output directory");
    let stdout = out_dir.path().join("stdout");
    let stderr = out_dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard-load"))
        .args(args)
        .env("SWITCHBOARD_LOAD_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("spawn switchboard-load");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the harness") {
            break status;
        }
        if start.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the harness ran longer than {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = format!(
        "--- stdout\n{}\n--- stderr\n{}",
        std::fs::read_to_string(&stdout).unwrap_or_default(),
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    (status.code(), output)
}

fn report(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("report.json")).expect("report.json written");
    serde_json::from_str(&text).expect("report.json is JSON")
}

fn u(v: &serde_json::Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("{path} missing in {v:#}"))
}

#[test]
fn the_smoke_scenario_passes_against_standalone() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let server = Server::start(dir.path());
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/smoke.toml");
    let url = format!("ws://127.0.0.1:{}/v1/connect", server.gateway);
    let reports = dir.path().join("reports");
    let pid = server.child.id().to_string();
    let (code, output) = harness(&[
        "run",
        scenario.to_str().expect("utf-8 path"),
        "--url",
        &url,
        "--report-dir",
        reports.to_str().expect("utf-8 path"),
        "--server-pid",
        &pid,
    ]);
    assert_eq!(
        code,
        Some(0),
        "smoke run failed:\n{output}\nserver log:\n{}",
        server.log()
    );
    assert!(output.contains("result: PASS"), "{output}");
    // The live progress line reached stderr.
    assert!(output.contains("] measure"), "{output}");

    let r = report(&reports);
    assert_eq!(r["passed"], true, "{r:#}");
    assert_eq!(r["scenario"], "smoke");
    assert_eq!(u(&r, "/connected"), 20, "10 users with 2 devices each");
    assert_eq!(u(&r, "/conversations"), 4);
    // Every expected delivery was checked and arrived (live or recovered).
    let expected = u(&r, "/correctness/expected");
    assert!(expected > 0, "{r:#}");
    assert_eq!(
        u(&r, "/correctness/delivered") + u(&r, "/correctness/recovered"),
        expected,
        "{r:#}"
    );
    for violation in [
        "lost",
        "duplicates",
        "reorders",
        "gaps",
        "accepted_not_delivered",
        "unknown",
        "refused_delivered",
        "duplicate_messages",
        "seq_mismatches",
    ] {
        assert_eq!(
            u(&r, &format!("/correctness/{violation}")),
            0,
            "{violation}: {r:#}"
        );
    }
    assert_eq!(r["delivered_ratio"], 1.0);
    // Churn ran: sessions reconnected.
    assert!(u(&r, "/totals/reconnects") > 0, "{r:#}");
    // Read markers and typing ran next to the messages and reached the members.
    for count in [
        "reads_acked",
        "receipts_received",
        "typing_acked",
        "typing_received",
    ] {
        assert!(u(&r, &format!("/totals/{count}")) > 0, "{count}: {r:#}");
    }
    // Every threshold of the scenario was checked and held.
    let checks = r["thresholds"].as_array().expect("thresholds");
    let names: Vec<&str> = checks.iter().filter_map(|c| c["name"].as_str()).collect();
    for name in [
        "e2e_p99_ms",
        "max_connect_failures",
        "max_skipped_sends",
        "min_delivered_ratio",
    ] {
        assert!(names.contains(&name), "{name} not checked: {names:?}");
    }
    assert!(checks.iter().all(|c| c["passed"] == true), "{checks:#?}");
    assert!(u(&r, "/latency/e2e/count") > 0);
    assert!(!r["intervals"].as_array().expect("intervals").is_empty());
    for file in [
        "report.md",
        "raw-agent-0.json",
        "latency-over-time.svg",
        "throughput-over-time.svg",
        "latency-distribution.svg",
    ] {
        let text =
            std::fs::read_to_string(reports.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(!text.is_empty(), "{file} is empty");
    }

    // The raw file alone merges into the same figures.
    let merged = dir.path().join("merged");
    let (code, output) = harness(&[
        "merge",
        reports.to_str().expect("utf-8 path"),
        "--report-dir",
        merged.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(code, Some(0), "merge failed:\n{output}");
    let m = report(&merged);
    assert_eq!(m["correctness"], r["correctness"]);
    assert_eq!(m["latency"], r["latency"]);
    assert_eq!(m["totals"], r["totals"]);
}

#[test]
fn a_missed_threshold_fails_the_run() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let server = Server::start(dir.path());
    // The smoke scenario with an e2e p99 limit no real run meets, and no churn.
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/smoke.toml"))
            .expect("smoke scenario");
    let text = text
        .replace("e2e_p99_ms = 2000", "e2e_p99_ms = 0.000001")
        .replace("duration = \"3s\"", "duration = \"1s\"");
    let scenario = dir.path().join("strict.toml");
    std::fs::write(&scenario, text).expect("write scenario");
    let url = format!("ws://127.0.0.1:{}/v1/connect", server.gateway);
    let (code, output) = harness(&[
        "run",
        scenario.to_str().expect("utf-8 path"),
        "--url",
        &url,
        "--quiet",
    ]);
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("FAIL: threshold e2e_p99_ms"), "{output}");
}
