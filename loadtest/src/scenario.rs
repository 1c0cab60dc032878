//! Scenario files: what a run does, written as TOML (`loadtest/scenarios/*.toml`).
//!
//! A scenario names its target gateways, its users and their devices, how fast they
//! connect, the conversation mix, the open-loop message rate, the phases (warmup,
//! measured duration, drain), optional reconnect churn and the pass/fail thresholds.
//! Unknown keys are refused so that a typo cannot silently change a run.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The default gateway endpoint when a scenario names none.
pub const DEFAULT_URL: &str = "ws://127.0.0.1:8080/v1/connect";

/// Largest conversation the server accepts (members).
pub const MAX_CONVERSATION_SIZE: usize = 10_000;

/// A whole scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, used in reports.
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub target: Target,
    pub users: Users,
    /// The conversation mix; empty means connections only (no traffic).
    #[serde(default)]
    pub conversations: Vec<ConversationMix>,
    #[serde(default)]
    pub load: Load,
    #[serde(default)]
    pub churn: Option<Churn>,
    #[serde(default)]
    pub thresholds: Thresholds,
    #[serde(default)]
    pub client: ClientTuning,
    #[serde(default)]
    pub max_throughput: MaxThroughput,
}

/// Where the clients connect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Target {
    /// Gateway endpoints; sessions are spread over them round-robin.
    pub urls: Vec<String>,
    /// `json` or `proto` client frames.
    pub encoding: WireEncoding,
    /// File holding the HS256 secret (the command line and environment take
    /// precedence; the secret itself is never written in a scenario).
    pub secret_file: Option<PathBuf>,
    /// Local addresses the connections come from, spread round-robin; empty lets
    /// the system pick. Each source address has its own ephemeral ports, so more
    /// addresses allow more connections than one address's port range.
    pub source_addrs: Vec<IpAddr>,
}

impl Default for Target {
    fn default() -> Self {
        Target {
            urls: vec![DEFAULT_URL.into()],
            encoding: WireEncoding::Json,
            secret_file: None,
            source_addrs: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireEncoding {
    Json,
    Proto,
}

/// The simulated users.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Users {
    /// Users in all (agents of a distributed run split them). Users not placed in a
    /// conversation only connect and stay idle.
    pub count: usize,
    /// Connections (devices) per user; every device of a member receives every
    /// message of the member's conversations.
    #[serde(default = "one")]
    pub devices: usize,
    /// New connections per second (per agent): the connect ramp.
    #[serde(default = "default_connect_rate")]
    pub connect_rate: f64,
}

fn one() -> usize {
    1
}

fn default_connect_rate() -> f64 {
    500.0
}

/// One kind of conversation in the mix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversationMix {
    pub kind: ConversationKind,
    /// Conversations of this kind (agents split them).
    pub count: usize,
    /// Members per conversation (2 for direct ones).
    #[serde(default)]
    pub size: Option<usize>,
    /// Share of the message rate these conversations carry, relative to the other
    /// entries' shares.
    #[serde(default = "one_f64")]
    pub share: f64,
}

fn one_f64() -> f64 {
    1.0
}

impl ConversationMix {
    /// Members of each conversation.
    pub fn members(&self) -> usize {
        match self.kind {
            ConversationKind::Direct => 2,
            ConversationKind::Group => self.size.unwrap_or(0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConversationKind {
    /// 1:1 conversations of two users.
    Direct,
    /// Groups of `size` members (a large group is a group with a large size).
    Group,
}

/// The traffic and the phases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Load {
    /// Messages per second over all conversations, on an open-loop schedule.
    pub rate: f64,
    /// Message body size.
    pub body_bytes: usize,
    /// Sends before the measured window (checked, not measured).
    #[serde(with = "duration_text")]
    pub warmup: Duration,
    /// The measured window. Without conversations, how long the connections are held.
    #[serde(with = "duration_text")]
    pub duration: Duration,
    /// Longest wait after the last send for missing acks, deliveries and recoveries.
    #[serde(with = "duration_text")]
    pub drain: Duration,
    /// Sends awaiting an ack per sending session; a due send that finds this many
    /// waiting is skipped and counted (generator saturation).
    pub max_in_flight: usize,
    /// Share of the deliveries (of other sessions' messages) for which the receiving
    /// session sends a read marker; the members then get `receipt` events. 0 = none.
    pub read_fraction: f64,
    /// Share of the sends that a `typing: true` from the sender precedes (at most
    /// one per sender and conversation every 2 s, within the server's typing rate
    /// limit); the other members get `typing` events. 0 = none.
    pub typing_fraction: f64,
    /// How long a send whose outcome is unknown (`unavailable`, `timeout`,
    /// `internal`, no answer, the connection lost) is retried with the same
    /// `client_msg_id`, as a client riding out an outage would, counted from its due
    /// time; on the connection the session has then. 0 = never retried (the send
    /// counts as unresolved).
    #[serde(with = "duration_text")]
    pub retry_for: Duration,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            rate: 0.0,
            body_bytes: 100,
            warmup: Duration::from_secs(2),
            duration: Duration::from_secs(10),
            drain: Duration::from_secs(10),
            max_in_flight: 32,
            read_fraction: 0.0,
            typing_fraction: 0.0,
            retry_for: Duration::ZERO,
        }
    }
}

/// Reconnect churn: every `interval`, `fraction` of the connected sessions close,
/// stay away for `downtime`, reconnect and recover what they missed with `sync`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Churn {
    pub fraction: f64,
    #[serde(with = "duration_text")]
    pub interval: Duration,
    #[serde(with = "duration_text", default = "default_downtime")]
    pub downtime: Duration,
}

fn default_downtime() -> Duration {
    Duration::from_millis(500)
}

/// Pass/fail limits; an absent limit is not checked. Correctness (every delivery,
/// no duplicates, order kept) is always checked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    pub e2e_p99_ms: Option<f64>,
    pub e2e_p999_ms: Option<f64>,
    pub ack_p99_ms: Option<f64>,
    pub connect_p99_ms: Option<f64>,
    /// Deliveries received (live or recovered) over deliveries expected.
    pub min_delivered_ratio: Option<f64>,
    /// Errors of every kind (refused sends, timeouts, unexpected disconnects).
    pub max_errors: Option<u64>,
    pub max_connect_failures: Option<u64>,
    /// Due sends the generator skipped at the in-flight bound (its saturation;
    /// sends skipped because churn had the session disconnected do not count).
    pub max_skipped_sends: Option<u64>,
}

/// Client-side sizes and timeouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTuning {
    #[serde(with = "duration_text")]
    pub connect_timeout: Duration,
    #[serde(with = "duration_text")]
    pub request_timeout: Duration,
    /// Events queued per connection before it stops reading.
    pub event_queue: usize,
    pub read_buffer: usize,
    pub write_buffer: usize,
}

impl Default for ClientTuning {
    fn default() -> Self {
        ClientTuning {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            event_queue: 256,
            read_buffer: 4096,
            write_buffer: 4096,
        }
    }
}

/// Defaults of `max-throughput` (its flags override them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaxThroughput {
    pub start: f64,
    pub step: f64,
    pub max: f64,
    /// A step passes while e2e p99 stays at or below this.
    pub target_p99_ms: f64,
    #[serde(with = "duration_text")]
    pub step_duration: Duration,
}

impl Default for MaxThroughput {
    fn default() -> Self {
        MaxThroughput {
            start: 500.0,
            step: 500.0,
            max: 10_000.0,
            target_p99_ms: 100.0,
            step_duration: Duration::from_secs(10),
        }
    }
}

/// Command-line overrides of a scenario.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub urls: Vec<String>,
    pub source_addrs: Vec<IpAddr>,
    pub duration: Option<Duration>,
    pub warmup: Option<Duration>,
    pub rate: Option<f64>,
}

impl Scenario {
    pub fn parse(text: &str) -> anyhow::Result<Scenario> {
        let scenario: Scenario = toml::from_str(text)?;
        scenario.validate()?;
        Ok(scenario)
    }

    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the scenario {}", path.display()))?;
        Scenario::parse(&text).with_context(|| format!("in the scenario {}", path.display()))
    }

    pub fn apply(&mut self, overrides: &Overrides) -> anyhow::Result<()> {
        if !overrides.urls.is_empty() {
            self.target.urls = overrides.urls.clone();
        }
        if !overrides.source_addrs.is_empty() {
            self.target.source_addrs = overrides.source_addrs.clone();
        }
        if let Some(duration) = overrides.duration {
            self.load.duration = duration;
        }
        if let Some(warmup) = overrides.warmup {
            self.load.warmup = warmup;
        }
        if let Some(rate) = overrides.rate {
            self.load.rate = rate;
        }
        self.validate()
    }

    /// Users the conversation mix needs (before splitting over agents).
    pub fn users_in_conversations(&self) -> usize {
        self.conversations
            .iter()
            .map(|c| c.count * c.members())
            .sum()
    }

    /// Whether the scenario sends messages at all.
    pub fn has_traffic(&self) -> bool {
        self.load.rate > 0.0 && self.conversations.iter().any(|c| c.count > 0)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.name.trim().is_empty(), "`name` is empty");
        anyhow::ensure!(!self.target.urls.is_empty(), "`target.urls` is empty");
        for url in &self.target.urls {
            anyhow::ensure!(
                url.starts_with("ws://") || url.starts_with("wss://"),
                "target url `{url}` is not a ws:// or wss:// URL"
            );
        }
        anyhow::ensure!(self.users.count > 0, "`users.count` must be positive");
        anyhow::ensure!(
            self.users.devices >= 1,
            "`users.devices` must be at least 1"
        );
        anyhow::ensure!(
            self.users.connect_rate.is_finite() && self.users.connect_rate > 0.0,
            "`users.connect_rate` must be positive"
        );
        for (i, mix) in self.conversations.iter().enumerate() {
            let members = mix.members();
            match mix.kind {
                ConversationKind::Direct => anyhow::ensure!(
                    mix.size.is_none() || mix.size == Some(2),
                    "conversations[{i}]: a direct conversation has 2 members"
                ),
                ConversationKind::Group => anyhow::ensure!(
                    (2..=MAX_CONVERSATION_SIZE).contains(&members),
                    "conversations[{i}]: a group needs a `size` from 2 to {MAX_CONVERSATION_SIZE}"
                ),
            }
            anyhow::ensure!(
                mix.share.is_finite() && mix.share >= 0.0,
                "conversations[{i}]: `share` must be zero or positive"
            );
        }
        let needed = self.users_in_conversations();
        anyhow::ensure!(
            needed <= self.users.count,
            "the conversations need {needed} users but `users.count` is {}",
            self.users.count
        );
        let load = &self.load;
        anyhow::ensure!(
            load.rate.is_finite() && load.rate >= 0.0,
            "`load.rate` must be zero or positive"
        );
        if load.rate > 0.0 {
            anyhow::ensure!(
                self.conversations
                    .iter()
                    .any(|c| c.count > 0 && c.share > 0.0),
                "`load.rate` is set but no conversation has a positive share"
            );
        }
        anyhow::ensure!(load.max_in_flight >= 1, "`load.max_in_flight` must be >= 1");
        for (name, fraction) in [
            ("read_fraction", load.read_fraction),
            ("typing_fraction", load.typing_fraction),
        ] {
            anyhow::ensure!(
                (0.0..=1.0).contains(&fraction),
                "`load.{name}` must be between 0 and 1"
            );
        }
        anyhow::ensure!(!load.duration.is_zero(), "`load.duration` must be positive");
        if let Some(churn) = &self.churn {
            anyhow::ensure!(
                (0.0..=1.0).contains(&churn.fraction),
                "`churn.fraction` must be between 0 and 1"
            );
            anyhow::ensure!(
                !churn.interval.is_zero(),
                "`churn.interval` must be positive"
            );
            anyhow::ensure!(
                churn.downtime < load.drain,
                "`churn.downtime` must be shorter than `load.drain` (reconnects finish in the drain)"
            );
        }
        if let Some(ratio) = self.thresholds.min_delivered_ratio {
            anyhow::ensure!(
                (0.0..=1.0).contains(&ratio),
                "`thresholds.min_delivered_ratio` must be between 0 and 1"
            );
        }
        let mt = &self.max_throughput;
        anyhow::ensure!(
            mt.start > 0.0 && mt.step > 0.0 && mt.max >= mt.start,
            "`max_throughput` needs start > 0, step > 0 and max >= start"
        );
        Ok(())
    }
}

/// Durations written as text: `30s`, `500ms`, `2m`.
mod duration_text {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        let ms = d.as_millis();
        if ms.is_multiple_of(1000) {
            s.serialize_str(&format!("{}s", ms / 1000))
        } else {
            s.serialize_str(&format!("{ms}ms"))
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        crate::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        name = "example"
        [target]
        urls = ["ws://127.0.0.1:8080/v1/connect", "ws://127.0.0.1:8081/v1/connect"]
        source_addrs = ["127.0.0.1", "127.0.0.2"]
        [users]
        count = 20
        devices = 2
        connect_rate = 100
        [[conversations]]
        kind = "direct"
        count = 4
        [[conversations]]
        kind = "group"
        count = 2
        size = 5
        share = 0.5
        [load]
        rate = 50
        duration = "5s"
        warmup = "1s"
        drain = "3s"
        [churn]
        fraction = 0.1
        interval = "2s"
        downtime = "200ms"
        [thresholds]
        e2e_p99_ms = 250
        min_delivered_ratio = 1.0
        max_errors = 0
    "#;

    #[test]
    fn a_full_scenario_parses() {
        let s = Scenario::parse(EXAMPLE).expect("valid");
        assert_eq!(s.target.urls.len(), 2);
        assert_eq!(s.target.source_addrs.len(), 2);
        assert_eq!(s.users.devices, 2);
        assert_eq!(s.conversations[1].members(), 5);
        assert_eq!(s.users_in_conversations(), 18);
        assert_eq!(s.load.duration, Duration::from_secs(5));
        assert_eq!(
            s.churn.as_ref().map(|c| c.downtime),
            Some(Duration::from_millis(200))
        );
        assert_eq!(s.thresholds.e2e_p99_ms, Some(250.0));
        assert!(s.has_traffic());
        // Round trip through the report's copy of the scenario.
        let text = toml::to_string(&s).expect("serializes");
        assert_eq!(Scenario::parse(&text).expect("reparses"), s);
    }

    #[test]
    fn unknown_keys_and_impossible_mixes_are_refused() {
        let typo = EXAMPLE.replace("connect_rate", "conect_rate");
        assert!(Scenario::parse(&typo).is_err());
        let too_many = EXAMPLE.replace("count = 20", "count = 10");
        let err = Scenario::parse(&too_many).unwrap_err().to_string();
        assert!(err.contains("need 18 users"), "{err}");
        let no_size = EXAMPLE.replace("size = 5\n", "");
        assert!(Scenario::parse(&no_size).is_err());
        let long_downtime = EXAMPLE.replace("downtime = \"200ms\"", "downtime = \"5s\"");
        assert!(Scenario::parse(&long_downtime).is_err());
        let too_many_reads = EXAMPLE.replace("rate = 50\n", "rate = 50\nread_fraction = 1.5\n");
        assert!(Scenario::parse(&too_many_reads).is_err());
        let typing = EXAMPLE.replace("rate = 50\n", "rate = 50\ntyping_fraction = 0.25\n");
        assert_eq!(
            Scenario::parse(&typing)
                .expect("valid")
                .load
                .typing_fraction,
            0.25
        );
    }

    #[test]
    fn overrides_replace_urls_duration_and_rate() {
        let mut s = Scenario::parse(EXAMPLE).expect("valid");
        s.apply(&Overrides {
            urls: vec!["ws://127.0.0.2:9000/v1/connect".into()],
            source_addrs: vec!["127.0.0.3".parse().expect("address")],
            duration: Some(Duration::from_secs(1)),
            warmup: None,
            rate: Some(7.0),
        })
        .expect("still valid");
        assert_eq!(s.target.urls, ["ws://127.0.0.2:9000/v1/connect"]);
        assert_eq!(
            s.target.source_addrs,
            ["127.0.0.3".parse::<IpAddr>().expect("address")]
        );
        assert_eq!(s.load.duration, Duration::from_secs(1));
        assert_eq!(s.load.rate, 7.0);
    }

    #[test]
    fn every_shipped_scenario_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("scenarios directory") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
                names.push(s.name);
            }
        }
        names.sort();
        assert_eq!(
            names,
            [
                "chat-1to1",
                "connect-storm",
                "groups",
                "groups-100",
                "hot-group",
                "idle-connections",
                "large-group",
                "smoke"
            ]
        );
    }
}
