//! Opening many client connections at a bounded rate, measuring each.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use switchboard_auth::Signer;
use switchboard_client::{Client, ConnectOptions, Encoding, Events};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::stats;

/// How the load clients connect. The buffer and queue sizes keep the generator's
/// memory per connection small so that its own footprint stays out of the way.
#[derive(Debug, Clone)]
pub struct ConnectSettings {
    /// WebSocket URL of the gateway's client endpoint.
    pub url: String,
    /// Local addresses the connections come from, round-robin by client index;
    /// empty lets the system pick.
    pub source_addrs: Vec<IpAddr>,
    pub encoding: Encoding,
    /// New connections started per second (the ramp).
    pub rate: f64,
    /// Lifetime of the minted tokens: longer than the whole run.
    pub token_ttl: Duration,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Requests awaiting an ack per connection (the client's own bound).
    pub max_in_flight: usize,
    /// Frames queued for each socket writer.
    pub outbound_queue: usize,
    /// Events queued for the application per connection.
    pub event_queue: usize,
    /// WebSocket read buffer per connection, in bytes.
    pub read_buffer: usize,
    /// WebSocket write buffer per connection, in bytes.
    pub write_buffer: usize,
}

impl ConnectSettings {
    fn options(&self, token: String, index: usize) -> ConnectOptions {
        let mut options = self.options_for(&self.url, token, format!("load-d{index}"));
        let (_, source) = crate::plan::endpoints(index, 1, self.source_addrs.len());
        options.local_addr = source.map(|source| self.source_addrs[source]);
        options
    }

    /// Options for one connection to `url` as `device`.
    pub fn options_for(&self, url: &str, token: String, device: String) -> ConnectOptions {
        let mut options = ConnectOptions::new(url, token)
            .device(device)
            .encoding(self.encoding)
            .request_timeout(self.request_timeout);
        options.connect_timeout = self.connect_timeout;
        options.max_in_flight = self.max_in_flight;
        options.outbound_queue = self.outbound_queue;
        options.event_queue = self.event_queue;
        options.read_buffer_size = self.read_buffer;
        options.write_buffer_size = self.write_buffer;
        // Every frame the harness receives is small; a bounded frame keeps a
        // misbehaving server from making the generator allocate much.
        options.max_message_size = 1024 * 1024;
        options
    }
}

/// The outcome of connecting a fleet of clients.
#[derive(Debug)]
pub struct Fleet {
    /// Per client index, its connection if it opened.
    pub clients: Vec<Option<(Client, Events)>>,
    /// Time from starting the TCP connect to the server's `welcome`.
    pub connect_latency: Histogram<u64>,
    /// Failed connects by error label.
    pub failures: BTreeMap<String, u64>,
    /// Wall time from the first connect to the last outcome.
    pub elapsed: Duration,
}

impl Fleet {
    pub fn connected(&self) -> usize {
        self.clients.iter().filter(|c| c.is_some()).count()
    }
}

/// Connect `count` clients as users `load-u0..`, starting at most `settings.rate`
/// connects per second. Every connect is awaited (each is bounded by the connect
/// timeout); failures are counted, not retried.
pub async fn connect_all(
    settings: &ConnectSettings,
    signer: &Signer,
    count: usize,
) -> anyhow::Result<Fleet> {
    anyhow::ensure!(
        settings.rate > 0.0,
        "the connect rate must be positive (got {})",
        settings.rate
    );
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for index in 0..count {
        let token = signer
            .sign(&crate::user_id(index), settings.token_ttl)
            .with_context(|| format!("signing a token for {}", crate::user_id(index)))?;
        let options = settings.options(token, index);
        let due = start + Duration::from_secs_f64(index as f64 / settings.rate);
        tasks.spawn(async move {
            tokio::time::sleep_until(due).await;
            let began = Instant::now();
            let result = Client::connect(options).await;
            (index, began.elapsed(), result)
        });
    }
    let mut clients: Vec<Option<(Client, Events)>> = (0..count).map(|_| None).collect();
    let mut connect_latency = stats::histogram();
    let mut failures = BTreeMap::new();
    let mut first_failure_logged = false;
    while let Some(joined) = tasks.join_next().await {
        let (index, took, result) = joined.context("a connect task panicked")?;
        match result {
            Ok(connection) => {
                stats::record(&mut connect_latency, took);
                clients[index] = Some(connection);
            }
            Err(error) => {
                if !first_failure_logged {
                    tracing::warn!(user = %crate::user_id(index), %error, "connect failed");
                    first_failure_logged = true;
                }
                *failures.entry(stats::error_label(&error)).or_default() += 1;
            }
        }
    }
    Ok(Fleet {
        clients,
        connect_latency,
        failures,
        elapsed: start.elapsed(),
    })
}

/// Close every client (normal close frames), waiting at most `limit` in total.
/// Returns how many had not finished closing by then.
pub async fn close_all(clients: impl IntoIterator<Item = Client>, limit: Duration) -> usize {
    let mut closing = JoinSet::new();
    for client in clients {
        closing.spawn(async move { client.close().await });
    }
    let total = closing.len();
    let mut done = 0;
    let deadline = Instant::now() + limit;
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, closing.join_next()).await {
        done += 1;
    }
    // Dropping the set aborts the stragglers; their sockets close with the tasks.
    total - done
}
