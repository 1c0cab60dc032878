//! Runs real `switchboard` processes for the end-to-end tests: standalone, or the four
//! services (and extra gateways) as separate processes, each on free loopback ports
//! with its data in a temporary directory.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use switchboard_client::{Client, ClientError, ConnectOptions, Encoding, Event, Events};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const SECRET: &str = "e2e-test-secret-e2e-test-secret-0123456789";
/// The cluster credential every process of a setup shares.
pub const CLUSTER_CREDENTIAL: &str = "e2e-cluster-credential-0123456789abcdef0123";
pub const WAIT: Duration = Duration::from_secs(15);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_switchboard")
}

/// A free loopback port for a server under test.
///
/// Not an ephemeral port (`127.0.0.1:0`): between releasing such a port and the server
/// binding it, the kernel may hand it to one of the many outgoing connections the
/// tests make, and the server then fails with "address in use". These ports come from
/// below Linux's ephemeral range (32768-60999), which outgoing connections never use,
/// from a counter that never repeats within this test process, starting at an offset
/// taken from the process id; one that something else holds is skipped.
pub fn free_port() -> u16 {
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

/// Ports of one gateway.
#[derive(Clone, Debug)]
pub struct GatewayPorts {
    pub listen: u16,
    pub grpc: u16,
    pub admin: u16,
}

impl GatewayPorts {
    pub fn new() -> Self {
        GatewayPorts {
            listen: free_port(),
            grpc: free_port(),
            admin: free_port(),
        }
    }

    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "SWITCHBOARD_GATEWAY__LISTEN".into(),
                format!("127.0.0.1:{}", self.listen),
            ),
            (
                "SWITCHBOARD_GATEWAY__GRPC_LISTEN".into(),
                format!("127.0.0.1:{}", self.grpc),
            ),
            (
                "SWITCHBOARD_GATEWAY__ADMIN_LISTEN".into(),
                format!("127.0.0.1:{}", self.admin),
            ),
        ]
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/connect", self.listen)
    }
}

/// Everything a set of processes shares: the data directory, backend ports, secret.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub env: Vec<(String, String)>,
    pub gateway: GatewayPorts,
}

impl Setup {
    /// Free ports for every service; `with_secret` configures a known HS256 secret
    /// (else standalone generates one in the data directory).
    pub fn new(with_secret: bool) -> Setup {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (pg, pa, rg, ra, sg, sa) = (
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        );
        let mut env: Vec<(String, String)> = vec![
            (
                "SWITCHBOARD_DATA_DIR".into(),
                dir.path().display().to_string(),
            ),
            (
                "SWITCHBOARD_PRESENCE__GRPC_LISTEN".into(),
                format!("127.0.0.1:{pg}"),
            ),
            (
                "SWITCHBOARD_PRESENCE__ADMIN_LISTEN".into(),
                format!("127.0.0.1:{pa}"),
            ),
            (
                "SWITCHBOARD_ROUTING__GRPC_LISTEN".into(),
                format!("127.0.0.1:{rg}"),
            ),
            (
                "SWITCHBOARD_ROUTING__ADMIN_LISTEN".into(),
                format!("127.0.0.1:{ra}"),
            ),
            (
                "SWITCHBOARD_STORAGE__GRPC_LISTEN".into(),
                format!("127.0.0.1:{sg}"),
            ),
            (
                "SWITCHBOARD_STORAGE__ADMIN_LISTEN".into(),
                format!("127.0.0.1:{sa}"),
            ),
            (
                "SWITCHBOARD_CLUSTER__PRESENCE_URL".into(),
                format!("http://127.0.0.1:{pg}"),
            ),
            (
                "SWITCHBOARD_CLUSTER__ROUTING_URL".into(),
                format!("http://127.0.0.1:{rg}"),
            ),
            (
                "SWITCHBOARD_CLUSTER__STORAGE_URL".into(),
                format!("http://127.0.0.1:{sg}"),
            ),
            (
                "SWITCHBOARD_LOG__LEVEL".into(),
                "warn,switchboard=info".into(),
            ),
            (
                "SWITCHBOARD_CLUSTER__CREDENTIAL".into(),
                CLUSTER_CREDENTIAL.into(),
            ),
        ];
        if with_secret {
            env.push(("SWITCHBOARD_AUTH__HS256_SECRET".into(), SECRET.into()));
        }
        Setup {
            dir,
            env,
            gateway: GatewayPorts::new(),
        }
    }

    /// Use the real backends started by `deploy/local/up.sh` (Redis, Kafka and the
    /// CQL server), with a key prefix, topic, consumer group and keyspace of this
    /// setup's own. Addresses come from `SB_TEST_REDIS_URL`, `SB_TEST_KAFKA_BROKERS`
    /// and `SB_TEST_SCYLLA_NODES`; a server that does not answer fails the test with
    /// a message saying how to start it.
    pub fn real_backends(&mut self) -> &mut Self {
        let redis =
            std::env::var("SB_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let kafka =
            std::env::var("SB_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
        let scylla =
            std::env::var("SB_TEST_SCYLLA_NODES").unwrap_or_else(|_| "127.0.0.1:9042".into());
        for (what, addr, script) in [
            (
                "Redis",
                redis.trim_start_matches("redis://").to_owned(),
                "redis",
            ),
            (
                "Kafka",
                kafka.split(',').next().unwrap_or_default().to_owned(),
                "kafka",
            ),
            (
                "the CQL server",
                scylla.split(',').next().unwrap_or_default().to_owned(),
                "cassandra",
            ),
        ] {
            let reachable = addr
                .parse::<std::net::SocketAddr>()
                .ok()
                .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok())
                .is_some();
            assert!(
                reachable,
                "{what} is not reachable at {addr}: start it with `deploy/local/up.sh {script}`"
            );
        }
        let id = unique_suffix();
        for (k, v) in [
            ("SWITCHBOARD_PRESENCE__BACKEND", "redis".to_owned()),
            ("SWITCHBOARD_PRESENCE__REDIS_URL", redis),
            (
                "SWITCHBOARD_PRESENCE__REDIS_KEY_PREFIX",
                format!("sbe2e{id}"),
            ),
            ("SWITCHBOARD_ROUTING__BACKEND", "kafka".to_owned()),
            ("SWITCHBOARD_ROUTING__KAFKA_BROKERS", kafka),
            ("SWITCHBOARD_ROUTING__KAFKA_TOPIC", format!("sbe2e-{id}")),
            ("SWITCHBOARD_ROUTING__KAFKA_GROUP", format!("sbe2e-{id}")),
            ("SWITCHBOARD_ROUTING__PARTITIONS", "4".to_owned()),
            ("SWITCHBOARD_STORAGE__BACKEND", "scylla".to_owned()),
            ("SWITCHBOARD_STORAGE__SCYLLA_NODES", scylla),
            (
                "SWITCHBOARD_STORAGE__SCYLLA_KEYSPACE",
                format!("sbe2e_{id}"),
            ),
        ] {
            self.set(k, &v);
        }
        self
    }

    pub fn set(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The port of one of this setup's `host:port` settings.
    pub fn port_of(&self, setting: &str) -> u16 {
        self.env
            .iter()
            .find(|(k, _)| k == setting)
            .and_then(|(_, v)| v.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{setting} is not a port in the environment"))
    }

    /// Start `service` (storage, presence or routing) with `extra` settings and wait
    /// until its admin port says ready.
    pub async fn spawn_ready(&self, service: &str, extra: &[(String, String)]) -> Proc {
        let proc = self.spawn(&[service], extra);
        let admin = format!("SWITCHBOARD_{}__ADMIN_LISTEN", service.to_uppercase());
        wait_ready_long(self.port_of(&admin), &proc).await;
        proc
    }

    /// A gateway on `ports`, ready for clients.
    pub async fn spawn_gateway(&self, ports: &GatewayPorts) -> Proc {
        let proc = self.spawn(&["gateway"], &ports.env());
        wait_ready_long(ports.listen, &proc).await;
        proc
    }

    /// The four services as separate processes: storage first (it creates the
    /// keyspace and applies the schema migrations), then presence, routing (with
    /// `routing_env` on top) and the setup's gateway, each waited for.
    pub async fn start_services(self, routing_env: &[(String, String)]) -> Services {
        let storage = self.spawn_ready("storage", &[]).await;
        let presence = self.spawn(&["presence"], &[]);
        let routing = self.spawn(&["routing"], routing_env);
        let gateway = self.spawn(&["gateway"], &self.gateway.env());
        wait_ready_long(
            self.port_of("SWITCHBOARD_PRESENCE__ADMIN_LISTEN"),
            &presence,
        )
        .await;
        wait_ready_long(self.port_of("SWITCHBOARD_ROUTING__ADMIN_LISTEN"), &routing).await;
        wait_ready_long(self.gateway.listen, &gateway).await;
        Services {
            setup: self,
            storage,
            presence,
            routing,
            gateway,
        }
    }

    /// Start a process running `args` with this setup's environment plus `extra`.
    pub fn spawn(&self, args: &[&str], extra: &[(String, String)]) -> Proc {
        let log = self
            .dir
            .path()
            .join(format!("{}-{}.log", args.join("-"), free_port()));
        let file = std::fs::File::create(&log).expect("create process log");
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().cloned())
            .envs(extra.iter().cloned())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file);
        let child = cmd.spawn().expect("spawn switchboard");
        Proc {
            child: Some(child),
            log,
        }
    }

    /// `switchboard standalone`, ready for clients.
    pub async fn standalone(&self) -> Proc {
        let proc = self.spawn(&["standalone"], &self.gateway.env());
        wait_ready(self.gateway.listen, &proc).await;
        proc
    }

    pub fn token(&self, user: &str) -> String {
        switchboard_auth::Signer::hs256(SECRET.as_bytes())
            .sign(user, Duration::from_secs(3600))
            .expect("sign a test token")
    }

    pub async fn connect(&self, user: &str, device: &str) -> (Client, Events) {
        connect_to(&self.gateway, &self.token(user), device, Encoding::Json).await
    }
}

pub async fn connect_to(
    gateway: &GatewayPorts,
    token: &str,
    device: &str,
    encoding: Encoding,
) -> (Client, Events) {
    Client::connect(
        ConnectOptions::new(gateway.ws_url(), token)
            .device(device)
            .encoding(encoding),
    )
    .await
    .unwrap_or_else(|e| panic!("connect to {}: {e}", gateway.ws_url()))
}

/// A short lowercase suffix unique to this test run.
pub fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", std::process::id(), nanos % 0xffff_ffff)
}

/// The four services as separate processes on one [`Setup`]; killed on drop.
pub struct Services {
    pub setup: Setup,
    pub storage: Proc,
    pub presence: Proc,
    pub routing: Proc,
    pub gateway: Proc,
}

/// A Redis of a test's own (no persistence) on `port`, so that it can be killed and
/// started again empty.
pub fn spawn_redis(setup: &Setup, port: u16) -> Proc {
    let log = setup.data_dir().join(format!("redis-{port}.log"));
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            log.to_str().expect("utf-8 path"),
        ])
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run redis-server ({e}): install it with `deploy/local/up.sh redis`")
        });
    Proc {
        child: Some(child),
        log,
    }
}

/// Wait until the Redis on `port` accepts connections (10 s at most).
pub async fn wait_redis(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "redis-server on {port} did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Shut the Redis on `port` down cleanly (`SHUTDOWN NOSAVE`) and wait for `redis`
/// to exit.
pub fn shut_down_redis(redis: &mut Proc, port: u16) {
    // redis-cli's own exit status reports the dropped connection: only its running
    // at all is checked.
    Command::new("redis-cli")
        .args(["-p", &port.to_string(), "shutdown", "nosave"])
        .status()
        .expect("redis-cli runs (installed by `deploy/local/up.sh redis`)");
    let stopped = redis.terminate(Duration::from_secs(10));
    assert!(stopped.is_some(), "redis-server stopped");
}

/// A running switchboard process; killed on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freeze the process (SIGSTOP): its sockets stay open and calls to it wait.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Let a paused process run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let pid = self.pid().to_string();
        let status = Command::new("kill")
            .args([which, &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {which} {pid}");
    }

    /// SIGTERM, then wait for the exit (at most `deadline`).
    pub fn terminate(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A plain HTTP GET on loopback: (status, body).
pub async fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Wait until `/readyz` on `port` answers 200; panics with the process log otherwise.
pub async fn wait_ready(port: u16, proc: &Proc) {
    wait_ready_within(port, proc, Duration::from_secs(30)).await
}

/// [`wait_ready`] with room for what real backends take at start: creating a keyspace
/// and its schema, joining a Kafka consumer group, on a busy machine.
pub async fn wait_ready_long(port: u16, proc: &Proc) {
    wait_ready_within(port, proc, Duration::from_secs(180)).await
}

async fn wait_ready_within(port: u16, proc: &Proc, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok((200, _)) = http_get(port, "/readyz").await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "port {port} not ready after {limit:?}; log:\n{}",
        proc.output()
    );
}

/// The next event matching `pred`, skipping others; panics after `WAIT`.
pub async fn next_matching<T>(
    events: &mut Events,
    what: &str,
    mut pred: impl FnMut(&Event) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(ev)) => {
                if let Some(t) = pred(&ev) {
                    return t;
                }
            }
            Ok(None) => panic!(
                "connection closed while waiting for {what}: {:?}",
                events.close_reason()
            ),
            Err(_) => panic!("no {what} within {WAIT:?}"),
        }
    }
}

/// The next `n` message events of a conversation, in arrival order.
pub async fn messages(
    events: &mut Events,
    conversation_id: &str,
    n: usize,
) -> Vec<switchboard_proto::Message> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let m = next_matching(events, "message event", |ev| match ev {
            Event::Message(m) if m.conversation_id == conversation_id => Some(m.clone()),
            _ => None,
        })
        .await;
        out.push(m);
    }
    out
}

/// The server error code of a failed call.
pub fn code_of<T: std::fmt::Debug>(r: Result<T, ClientError>) -> switchboard_proto::ErrorCode {
    match r {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// A file of the local test CA (`SB_TEST_TLS_DIR`, default `<repo>/.local/tls`).
pub fn tls_file(name: &str) -> String {
    let dir = std::env::var("SB_TEST_TLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.local/tls"));
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: `deploy/local/up.sh` generates it (or set SB_TEST_TLS_DIR)",
        path.display()
    );
    path.display().to_string()
}
