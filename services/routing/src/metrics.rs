//! The routing service's Prometheus metrics.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use switchboard_telemetry::latency_buckets;

/// Every metric of the service, registered in the registry served on the admin port.
pub(crate) struct Metrics {
    /// Sends acked, by whether they were retries of an accepted message.
    pub sends_accepted: IntCounterVec,
    /// Sends refused, by client error code.
    pub sends_rejected: IntCounterVec,
    /// Time to append a record durably to the event log.
    pub log_append_seconds: Histogram,
    /// Messages given a new sequence and persisted.
    pub messages_sequenced: IntCounter,
    /// Records that mapped to an already stored message (retries, replays).
    pub duplicates_sequenced: IntCounter,
    /// Time of one storage AppendBatch call (the records of one conversation).
    pub storage_append_seconds: Histogram,
    /// Records persisted by one storage AppendBatch call.
    pub storage_append_batch: Histogram,
    /// Storage AppendBatch calls that failed (and were retried).
    pub storage_append_failures: IntCounter,
    /// Send calls that stopped waiting for their sequence (acked with seq 0).
    pub sequence_wait_timeouts: IntCounter,
    /// Deliver calls made to gateways.
    pub deliver_calls: IntCounter,
    /// Deliver calls that failed.
    pub deliver_failures: IntCounter,
    /// Deliveries dropped, by reason (`deliver_failed`, `queue_full`, `shutdown`).
    pub deliveries_dropped: IntCounterVec,
    /// Failed member or route lookups during fan-out (each is retried, or the
    /// event goes to every known gateway).
    pub route_failures: IntCounter,
    /// Fan-outs sent to every known gateway because presence was unreachable or
    /// rebuilding its state.
    pub superset_fanouts: IntCounter,
    /// Fan-outs that reused the routes of an earlier message of the same batch
    /// instead of asking presence.
    pub routes_reused: IntCounter,
    /// Resync deliveries that reached a gateway after deliveries to it had failed.
    pub resyncs_delivered: IntCounter,
    /// Sends whose sequence was read back from storage (another instance owns the
    /// conversation's partition).
    pub sequences_read_back: IntCounter,
    /// Deliveries queued per gateway.
    pub gateway_queue_depth: IntGaugeVec,
    /// Ephemeral events published.
    pub published: IntCounter,
    /// Partitions this instance owns (runs a partition owner for) now.
    pub partitions_owned: IntGauge,
    /// Webhook batches acknowledged by their receiver (2xx).
    pub webhook_deliveries: IntCounter,
    /// Events in acknowledged webhook batches.
    pub webhook_events: IntCounter,
    /// Failed webhook delivery attempts (retried), by reason (`status`, `transport`,
    /// `timeout`, `storage`).
    pub webhook_failures: IntCounterVec,
    /// Age of the newest event of a webhook batch when its receiver acknowledged it.
    pub webhook_lag_seconds: Histogram,
    /// Webhooks this instance dispatches now (of the partitions it owns).
    pub webhooks_dispatching: IntGauge,
}

impl Metrics {
    pub fn new(registry: &Registry) -> anyhow::Result<Metrics> {
        let histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(latency_buckets()))
        };
        let m = Metrics {
            sends_accepted: IntCounterVec::new(
                Opts::new(
                    "switchboard_routing_sends_accepted_total",
                    "sends acked as durable",
                ),
                &["duplicate"],
            )?,
            sends_rejected: IntCounterVec::new(
                Opts::new(
                    "switchboard_routing_sends_rejected_total",
                    "sends refused, by error code",
                ),
                &["code"],
            )?,
            log_append_seconds: histogram(
                "switchboard_routing_log_append_seconds",
                "time to append a record durably to the event log",
            )?,
            messages_sequenced: IntCounter::new(
                "switchboard_routing_messages_sequenced_total",
                "messages given a new sequence and persisted",
            )?,
            duplicates_sequenced: IntCounter::new(
                "switchboard_routing_duplicate_records_total",
                "records that mapped to an already stored message",
            )?,
            storage_append_seconds: histogram(
                "switchboard_routing_storage_append_seconds",
                "time of one storage AppendBatch call (one conversation's records of a poll)",
            )?,
            storage_append_batch: Histogram::with_opts(
                HistogramOpts::new(
                    "switchboard_routing_storage_append_batch_records",
                    "records persisted by one storage AppendBatch call",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]),
            )?,
            storage_append_failures: IntCounter::new(
                "switchboard_routing_storage_append_failures_total",
                "storage AppendBatch calls that failed and were retried",
            )?,
            sequence_wait_timeouts: IntCounter::new(
                "switchboard_routing_sequence_wait_timeouts_total",
                "sends acked without their sequence because sequencing took too long",
            )?,
            deliver_calls: IntCounter::new(
                "switchboard_routing_deliver_calls_total",
                "Deliver calls made to gateways",
            )?,
            deliver_failures: IntCounter::new(
                "switchboard_routing_deliver_failures_total",
                "Deliver calls that failed",
            )?,
            deliveries_dropped: IntCounterVec::new(
                Opts::new(
                    "switchboard_routing_deliveries_dropped_total",
                    "deliveries dropped, by reason",
                ),
                &["reason"],
            )?,
            route_failures: IntCounter::new(
                "switchboard_routing_route_failures_total",
                "Failed member or route lookups during fan-out (retried, or sent to every known gateway)",
            )?,
            superset_fanouts: IntCounter::new(
                "switchboard_routing_superset_fanouts_total",
                "Fan-outs sent to every known gateway because presence was unreachable or rebuilding",
            )?,
            routes_reused: IntCounter::new(
                "switchboard_routing_routes_reused_total",
                "Fan-outs that reused the routes looked up for an earlier message of the same stored batch",
            )?,
            sequences_read_back: IntCounter::new(
                "switchboard_routing_sequences_read_back_total",
                "Sends whose sequence was read back from storage because another instance owns the partition",
            )?,
            resyncs_delivered: IntCounter::new(
                "switchboard_routing_resyncs_delivered_total",
                "Resync deliveries that reached a gateway after deliveries to it had failed",
            )?,
            gateway_queue_depth: IntGaugeVec::new(
                Opts::new(
                    "switchboard_routing_gateway_queue_depth",
                    "deliveries queued per gateway",
                ),
                &["gateway"],
            )?,
            published: IntCounter::new(
                "switchboard_routing_published_total",
                "ephemeral events published",
            )?,
            partitions_owned: IntGauge::new(
                "switchboard_routing_partitions_owned",
                "event log partitions this instance owns now",
            )?,
            webhook_deliveries: IntCounter::new(
                "switchboard_routing_webhook_deliveries_total",
                "webhook batches acknowledged by their receiver",
            )?,
            webhook_events: IntCounter::new(
                "switchboard_routing_webhook_events_delivered_total",
                "events in acknowledged webhook batches",
            )?,
            webhook_failures: IntCounterVec::new(
                Opts::new(
                    "switchboard_routing_webhook_failures_total",
                    "failed webhook delivery attempts (retried), by reason",
                ),
                &["reason"],
            )?,
            webhook_lag_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "switchboard_routing_webhook_lag_seconds",
                    "age of the newest event of a webhook batch when it was acknowledged",
                )
                .buckets(vec![
                    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                ]),
            )?,
            webhooks_dispatching: IntGauge::new(
                "switchboard_routing_webhooks_dispatching",
                "webhooks this instance dispatches now",
            )?,
        };
        registry.register(Box::new(m.partitions_owned.clone()))?;
        registry.register(Box::new(m.webhook_deliveries.clone()))?;
        registry.register(Box::new(m.webhook_events.clone()))?;
        registry.register(Box::new(m.webhook_failures.clone()))?;
        registry.register(Box::new(m.webhook_lag_seconds.clone()))?;
        registry.register(Box::new(m.webhooks_dispatching.clone()))?;
        registry.register(Box::new(m.sends_accepted.clone()))?;
        registry.register(Box::new(m.sends_rejected.clone()))?;
        registry.register(Box::new(m.log_append_seconds.clone()))?;
        registry.register(Box::new(m.messages_sequenced.clone()))?;
        registry.register(Box::new(m.duplicates_sequenced.clone()))?;
        registry.register(Box::new(m.storage_append_seconds.clone()))?;
        registry.register(Box::new(m.storage_append_failures.clone()))?;
        registry.register(Box::new(m.storage_append_batch.clone()))?;
        registry.register(Box::new(m.sequence_wait_timeouts.clone()))?;
        registry.register(Box::new(m.deliver_calls.clone()))?;
        registry.register(Box::new(m.deliver_failures.clone()))?;
        registry.register(Box::new(m.deliveries_dropped.clone()))?;
        registry.register(Box::new(m.route_failures.clone()))?;
        registry.register(Box::new(m.superset_fanouts.clone()))?;
        registry.register(Box::new(m.routes_reused.clone()))?;
        registry.register(Box::new(m.resyncs_delivered.clone()))?;
        registry.register(Box::new(m.sequences_read_back.clone()))?;
        registry.register(Box::new(m.gateway_queue_depth.clone()))?;
        registry.register(Box::new(m.published.clone()))?;
        Ok(m)
    }
}
