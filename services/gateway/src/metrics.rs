//! The gateway's Prometheus metrics, registered in the registry served on `/metrics`.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Metric handles; cloning shares the underlying series.
#[derive(Clone)]
pub(crate) struct Metrics {
    /// Open client connections (including upgrades in progress).
    pub connections: IntGauge,
    /// Upgrades refused, by reason (`unauthorized`, `bad_subprotocol`, `bad_device`,
    /// `draining`, `at_capacity`, `unavailable`).
    pub connections_rejected: IntCounterVec,
    /// Client frames received, by request type (`invalid` when undecodable).
    pub frames_in: IntCounterVec,
    /// Server frames written, by frame type.
    pub frames_out: IntCounterVec,
    /// Sends acked as accepted.
    pub messages_accepted: IntCounter,
    /// Message events enqueued for a client.
    pub messages_delivered: IntCounter,
    /// Time from a message's `sent_at_ms` to its enqueueing for a client.
    pub send_to_deliver: Histogram,
    /// Frames sitting in all outbound queues together.
    pub outbound_queued: IntGauge,
    /// Ephemeral events (typing, presence, receipt) dropped because a client's queue
    /// was more than half full, by type.
    pub events_dropped: IntCounterVec,
    /// Sessions closed because they could not keep up.
    pub slow_consumer_disconnects: IntCounter,
    /// Closed sessions left to expire by TTL because the unregister queue was full.
    pub unregister_skipped: IntCounter,
    /// Protocol violations, by error code.
    pub violations: IntCounterVec,
    /// `resync` events queued for sessions, by reason (`presence_lost`,
    /// `delivery_failed`, `gap`).
    pub resyncs_sent: IntCounterVec,
    /// Times this gateway registered all its sessions again because presence lost
    /// its state or was unreachable.
    pub presence_rebuilds: IntCounter,
    /// Connections served while presence was unreachable, registered later.
    pub registrations_deferred: IntCounter,
}

impl Metrics {
    pub(crate) fn new(registry: &Registry) -> anyhow::Result<Metrics> {
        let m = Metrics {
            connections: IntGauge::new(
                "switchboard_gateway_connections",
                "Open client connections",
            )?,
            connections_rejected: IntCounterVec::new(
                Opts::new(
                    "switchboard_gateway_connections_rejected_total",
                    "Connection upgrades refused, by reason",
                ),
                &["reason"],
            )?,
            frames_in: IntCounterVec::new(
                Opts::new(
                    "switchboard_gateway_frames_in_total",
                    "Client frames received, by type",
                ),
                &["type"],
            )?,
            frames_out: IntCounterVec::new(
                Opts::new(
                    "switchboard_gateway_frames_out_total",
                    "Server frames written, by type",
                ),
                &["type"],
            )?,
            messages_accepted: IntCounter::new(
                "switchboard_gateway_messages_accepted_total",
                "Sends acknowledged as accepted",
            )?,
            messages_delivered: IntCounter::new(
                "switchboard_gateway_messages_delivered_total",
                "Message events enqueued for clients",
            )?,
            send_to_deliver: Histogram::with_opts(
                HistogramOpts::new(
                    "switchboard_gateway_send_to_deliver_seconds",
                    "Time from a message's acceptance to its enqueueing for a recipient",
                )
                .buckets(switchboard_telemetry::latency_buckets()),
            )?,
            outbound_queued: IntGauge::new(
                "switchboard_gateway_outbound_queued_frames",
                "Frames waiting in all client outbound queues",
            )?,
            events_dropped: IntCounterVec::new(
                Opts::new(
                    "switchboard_gateway_events_dropped_total",
                    "Ephemeral events dropped for clients whose queue is more than half full, by type",
                ),
                &["type"],
            )?,
            slow_consumer_disconnects: IntCounter::new(
                "switchboard_gateway_slow_consumer_disconnects_total",
                "Sessions closed because they could not keep up with their events",
            )?,
            unregister_skipped: IntCounter::new(
                "switchboard_gateway_unregister_skipped_total",
                "Closed sessions not unregistered from presence (queue full); they expire by TTL",
            )?,
            violations: IntCounterVec::new(
                Opts::new(
                    "switchboard_gateway_violations_total",
                    "Client protocol violations, by error code",
                ),
                &["code"],
            )?,
            resyncs_sent: IntCounterVec::new(
                Opts::new(
                    "switchboard_gateway_resyncs_sent_total",
                    "Resync events queued for sessions that may have missed events, by reason",
                ),
                &["reason"],
            )?,
            registrations_deferred: IntCounter::new(
                "switchboard_gateway_registrations_deferred_total",
                "Connections served while presence was unreachable; registered once it answers",
            )?,
            presence_rebuilds: IntCounter::new(
                "switchboard_gateway_presence_rebuilds_total",
                "Registrations of every session again after presence lost its state or was unreachable",
            )?,
        };
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.connections_rejected.clone()))?;
        registry.register(Box::new(m.frames_in.clone()))?;
        registry.register(Box::new(m.frames_out.clone()))?;
        registry.register(Box::new(m.messages_accepted.clone()))?;
        registry.register(Box::new(m.messages_delivered.clone()))?;
        registry.register(Box::new(m.send_to_deliver.clone()))?;
        registry.register(Box::new(m.outbound_queued.clone()))?;
        registry.register(Box::new(m.events_dropped.clone()))?;
        registry.register(Box::new(m.slow_consumer_disconnects.clone()))?;
        registry.register(Box::new(m.violations.clone()))?;
        registry.register(Box::new(m.unregister_skipped.clone()))?;
        registry.register(Box::new(m.resyncs_sent.clone()))?;
        registry.register(Box::new(m.presence_rebuilds.clone()))?;
        registry.register(Box::new(m.registrations_deferred.clone()))?;
        Ok(m)
    }
}
