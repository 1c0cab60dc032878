//! The presence service's Prometheus metrics.

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry,
};

/// Why a presence event did not reach a gateway (label `reason` of
/// `presence_events_dropped_total`).
pub(crate) const DROP_QUEUE_FULL: &str = "queue_full";
pub(crate) const DROP_GATEWAY_QUEUE_FULL: &str = "gateway_queue_full";
pub(crate) const DROP_DELIVER_FAILED: &str = "deliver_failed";
pub(crate) const DROP_LOOKUP_FAILED: &str = "lookup_failed";
pub(crate) const DROP_PUBLISH_FAILED: &str = "publish_failed";

/// Outcomes of `RouteConversation` (label `result` of
/// `switchboard_presence_interest_lookups_total`).
pub(crate) const INTEREST_HIT: &str = "hit";
pub(crate) const INTEREST_MISS: &str = "miss";

/// Metric handles, registered once in the service's registry.
#[derive(Clone)]
pub(crate) struct Metrics {
    /// Live sessions (refreshed by the sweeper).
    pub sessions: IntGauge,
    /// Users with at least one live session (refreshed by the sweeper).
    pub online_users: IntGauge,
    /// Presence events accepted by a gateway's `Deliver` (one per event and gateway).
    pub events_sent: IntCounter,
    /// Presence events given up, by reason.
    pub events_dropped: IntCounterVec,
    /// Failed `Deliver` calls to gateways.
    pub deliver_failures: IntCounter,
    /// Sessions per `Heartbeat` call.
    pub heartbeat_sessions: Histogram,
    /// Heartbeated sessions the store did not know (expired or never registered).
    pub heartbeat_unknown: IntCounter,
    /// Users whose aggregated status changed because sessions expired by TTL.
    pub expired_offline: IntCounter,
    /// Latency of each gRPC method, by method.
    pub rpc_seconds: HistogramVec,
    /// `RouteConversation` answers, by result (`hit`: from the interest index;
    /// `miss`: computed). Invalidations are counted by the store
    /// (`switchboard_presence_interest_invalidations_total`).
    pub interest_lookups: IntCounterVec,
    /// Times this instance saw the session store's state new or lost (a new epoch).
    pub state_losses: IntCounter,
}

impl Metrics {
    pub fn register(registry: &Registry) -> anyhow::Result<Metrics> {
        let metrics = Metrics {
            sessions: IntGauge::new("switchboard_presence_sessions", "live sessions")?,
            online_users: IntGauge::new(
                "switchboard_presence_online_users",
                "users with at least one live session",
            )?,
            events_sent: IntCounter::new(
                "switchboard_presence_events_sent_total",
                "presence events accepted by a gateway (one per event and gateway)",
            )?,
            events_dropped: IntCounterVec::new(
                Opts::new(
                    "switchboard_presence_events_dropped_total",
                    "presence events given up (presence is ephemeral), by reason",
                ),
                &["reason"],
            )?,
            deliver_failures: IntCounter::new(
                "switchboard_presence_deliver_failures_total",
                "failed Deliver calls to gateways",
            )?,
            heartbeat_sessions: Histogram::with_opts(
                HistogramOpts::new(
                    "switchboard_presence_heartbeat_sessions",
                    "sessions per Heartbeat call",
                )
                .buckets(exponential_buckets(1.0, 4.0, 10)?),
            )?,
            heartbeat_unknown: IntCounter::new(
                "switchboard_presence_heartbeat_unknown_sessions_total",
                "heartbeated sessions that were not live (the gateway registers them again)",
            )?,
            expired_offline: IntCounter::new(
                "switchboard_presence_expired_users_total",
                "users whose presence changed because sessions expired by TTL",
            )?,
            rpc_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "switchboard_presence_rpc_seconds",
                    "latency of presence gRPC methods",
                )
                .buckets(switchboard_telemetry::latency_buckets()),
                &["method"],
            )?,
            interest_lookups: IntCounterVec::new(
                Opts::new(
                    "switchboard_presence_interest_lookups_total",
                    "RouteConversation answers, by result (hit: cached interest entry, miss: computed)",
                ),
                &["result"],
            )?,
            state_losses: IntCounter::new(
                "switchboard_presence_state_losses_total",
                "Times the session store's state was seen new or lost (routes partial while gateways register again)",
            )?,
        };
        registry.register(Box::new(metrics.sessions.clone()))?;
        registry.register(Box::new(metrics.online_users.clone()))?;
        registry.register(Box::new(metrics.events_sent.clone()))?;
        registry.register(Box::new(metrics.events_dropped.clone()))?;
        registry.register(Box::new(metrics.deliver_failures.clone()))?;
        registry.register(Box::new(metrics.heartbeat_sessions.clone()))?;
        registry.register(Box::new(metrics.heartbeat_unknown.clone()))?;
        registry.register(Box::new(metrics.expired_offline.clone()))?;
        registry.register(Box::new(metrics.rpc_seconds.clone()))?;
        registry.register(Box::new(metrics.interest_lookups.clone()))?;
        registry.register(Box::new(metrics.state_losses.clone()))?;
        Ok(metrics)
    }

    pub fn dropped(&self, reason: &str, n: u64) {
        self.events_dropped.with_label_values(&[reason]).inc_by(n);
    }
}
