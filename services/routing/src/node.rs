//! What the gRPC handlers and the partition owners share: peers, caches, the log,
//! the fan-out queues, metrics and health.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchboard_config::Config;
use switchboard_proto::timeline::kinds;
use switchboard_proto::v1::server_frame::Event;
use switchboard_proto::v1::{
    Delivery, GatewayRoute, Message, MessageEvent, RouteConversationRequest, RouteRequest,
    ServerFrame,
};
use switchboard_rpc::{PresenceApi, PresenceInterestApi, StorageApi};
use switchboard_telemetry::Readiness;
use tokio_util::sync::CancellationToken;

use crate::error::RoutingError;
use crate::eventlog::EventLog;
use crate::fanout::Fanout;
use crate::gateways::KnownGateways;
use crate::members::{MemberCache, Members};
use crate::metrics::Metrics;
use crate::waiters::Waiters;
use crate::webhooks::WebhookWake;

/// Route lookups of a fan-out tried before falling back to every known gateway.
const ROUTE_ATTEMPTS: u32 = 3;
/// Backoff before the first retry of a lookup during fan-out; doubles up to the max.
const LOOKUP_BACKOFF: Duration = Duration::from_millis(20);
const LOOKUP_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// After a failed route lookup, fan-outs go straight to every known gateway for this
/// long instead of each paying for lookups that fail (or time out) too.
const PRESENCE_HOLD_OFF: Duration = Duration::from_secs(1);

/// The partition owner was told to stop before the fan-out in hand was done: its
/// records are not committed, and the next owner replays them.
pub(crate) struct Stopped;

/// Where users are, as presence answered.
pub(crate) struct Routed {
    pub routes: Vec<GatewayRoute>,
    /// Presence is rebuilding its state: the routes may miss sessions.
    pub partial: bool,
}

/// The routes of the message a batch's fan-out looked up first (see
/// [`Node::fan_out_in_batch`]).
#[derive(Default)]
pub(crate) struct RouteMemo {
    routes: Option<Vec<GatewayRoute>>,
}

pub(crate) struct Node {
    pub config: Arc<Config>,
    pub log: Arc<dyn EventLog>,
    pub storage: StorageApi,
    pub presence: PresenceApi,
    /// Presence's cached per-conversation routes (the interest index).
    pub interest: PresenceInterestApi,
    /// False once presence answered `unimplemented` (an older presence): fan-out then
    /// routes every member with `Route`.
    pub interest_supported: AtomicBool,
    pub members: MemberCache,
    pub waiters: Arc<Waiters>,
    pub fanout: Fanout,
    /// Gateways named in routes: the superset fan-out falls back to.
    pub gateways: KnownGateways,
    /// Until when fan-out skips presence after a failed route lookup.
    pub presence_hold_off: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Wakes the webhook dispatchers of a conversation when its owner persisted.
    pub webhooks: WebhookWake,
    pub metrics: Arc<Metrics>,
    pub health: Health,
}

impl Node {
    /// Where `users` have live sessions.
    pub async fn route(&self, users: &[String]) -> Result<Routed, RoutingError> {
        if users.is_empty() {
            return Ok(Routed {
                routes: Vec::new(),
                partial: false,
            });
        }
        let reply = self
            .presence
            .clone()
            .route(RouteRequest {
                user_ids: users.to_vec(),
            })
            .await
            .map_err(|st| RoutingError::peer("presence Route", &st))?
            .into_inner();
        self.gateways.note(&reply.routes);
        Ok(Routed {
            routes: reply.routes,
            partial: reply.partial,
        })
    }

    /// Where the members of a conversation have live sessions, from presence's
    /// interest index: for a hot conversation one cached lookup however many members
    /// it has, instead of one lookup per member.
    pub async fn route_conversation(
        &self,
        conversation_id: &str,
        members: &[String],
    ) -> Result<Routed, RoutingError> {
        if members.is_empty() {
            return Ok(Routed {
                routes: Vec::new(),
                partial: false,
            });
        }
        if !self.interest_supported.load(Ordering::Relaxed) {
            return self.route(members).await;
        }
        let reply = self
            .interest
            .clone()
            .route_conversation(RouteConversationRequest {
                conversation_id: conversation_id.to_owned(),
                member_ids: members.to_vec(),
            })
            .await;
        match reply {
            Ok(r) => {
                let reply = r.into_inner();
                self.gateways.note(&reply.routes);
                Ok(Routed {
                    routes: reply.routes,
                    partial: reply.partial,
                })
            }
            Err(st) if st.code() == tonic::Code::Unimplemented => {
                tracing::warn!("presence has no interest index; routing every member instead");
                self.interest_supported.store(false, Ordering::Relaxed);
                self.route(members).await
            }
            Err(st) => Err(RoutingError::peer("presence RouteConversation", &st)),
        }
    }

    /// Fan a stored message out to the gateways of its conversation's online
    /// members, in order, waiting for queue room (backpressure).
    ///
    /// A system event also reaches the users it names and its actor, members or not
    /// (so a kicked, banned or leaving user sees it), routed user by user.
    ///
    /// Nothing is given up because a lookup failed: the member list is read from
    /// storage until it answers; the routes are asked from presence a few times, then
    /// the message goes to every known gateway (with every user as a recipient), and
    /// while no gateway is known the lookup is retried. For [`PRESENCE_HOLD_OFF`]
    /// after a failed lookup, fan-outs skip presence and go to every known gateway at
    /// once, so an unreachable presence does not slow every conversation down. A
    /// `partial` answer (presence rebuilding) also goes to every known gateway.
    /// `Stopped` when `stop` fired first. (The partition owner fans a batch out
    /// through [`Node::fan_out_in_batch`].)
    #[cfg(test)]
    pub async fn fan_out_message(
        &self,
        message: &Message,
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        self.fan_out_in_batch(message, &mut RouteMemo::default(), stop)
            .await
    }

    /// `fan_out_message` (above) for one of the messages of a conversation stored by
    /// one AppendBatch, in order: the routes the first one looked up serve the
    /// others (as if they had been one message), so a batch costs one presence
    /// lookup. A system event looks its routes up itself and clears the memo (it may
    /// have changed the members).
    pub(crate) async fn fan_out_in_batch(
        &self,
        message: &Message,
        memo: &mut RouteMemo,
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        let is_system = message.kind == kinds::SYSTEM;
        if is_system {
            memo.routes = None;
        }
        if let Some(routes) = &memo.routes {
            self.metrics.routes_reused.inc();
            let routes = routes.clone();
            self.deliver_to_routes(message, routes).await;
            return Ok(());
        }
        let Some(members) = self.fan_out_members(&message.conversation_id, stop).await? else {
            return Ok(());
        };
        let outsiders: Vec<String> = match &message.system {
            Some(system) if message.kind == kinds::SYSTEM => {
                let mut users: Vec<String> = system
                    .user_ids
                    .iter()
                    .chain(std::iter::once(&system.actor_id))
                    .filter(|u| !u.is_empty() && !members.contains(u))
                    .cloned()
                    .collect();
                users.sort();
                users.dedup();
                users
            }
            _ => Vec::new(),
        };
        let users = || {
            let mut users = members.as_slice().to_vec();
            users.extend(outsiders.iter().cloned());
            users
        };
        let mut backoff = LOOKUP_BACKOFF;
        let mut attempt = 0u32;
        let routes = loop {
            attempt += 1;
            if attempt == 1 && self.holding_off() {
                let known = self.gateways.all();
                if !known.is_empty() {
                    self.metrics.superset_fanouts.inc();
                    break self.superset(users(), &[]);
                }
            }
            let routed = if outsiders.is_empty() {
                self.route_conversation(&message.conversation_id, members.as_slice())
                    .await
            } else {
                self.route(&users()).await
            };
            match routed {
                Ok(r) if !r.partial => break r.routes,
                Ok(r) => {
                    self.metrics.superset_fanouts.inc();
                    break self.superset(users(), &r.routes);
                }
                Err(e) => {
                    self.metrics.route_failures.inc();
                    self.hold_off();
                    if attempt == 1 || attempt.is_multiple_of(10) {
                        tracing::warn!(conversation_id = %message.conversation_id, seq = message.seq, attempt, error = %e, "route lookup failed");
                    }
                    if attempt >= ROUTE_ATTEMPTS && !self.gateways.all().is_empty() {
                        self.metrics.superset_fanouts.inc();
                        break self.superset(users(), &[]);
                    }
                    sleep_or_stop(backoff, stop).await?;
                    backoff = (backoff * 2).min(LOOKUP_BACKOFF_MAX);
                }
            }
        };
        if !is_system {
            memo.routes = Some(routes.clone());
        }
        self.deliver_to_routes(message, routes).await;
        Ok(())
    }

    /// Queue `message` for each gateway route, in order (waiting for queue room).
    async fn deliver_to_routes(&self, message: &Message, routes: Vec<GatewayRoute>) {
        let event = ServerFrame {
            event: Some(Event::Message(MessageEvent {
                message: Some(message.clone()),
            })),
        };
        for route in routes {
            if route.user_ids.is_empty() {
                continue;
            }
            let delivery = Delivery {
                event: Some(event.clone()),
                recipients: route.user_ids,
                exclude_session_id: String::new(),
                all_local_sessions: false,
            };
            self.fanout
                .enqueue_ordered(&route.gateway_addr, delivery)
                .await;
        }
    }

    /// The conversation's members for a fan-out, read until storage answers; `None`
    /// when the conversation does not exist (nobody to deliver to).
    async fn fan_out_members(
        &self,
        conversation_id: &str,
        stop: &CancellationToken,
    ) -> Result<Option<Arc<Members>>, Stopped> {
        let mut backoff = LOOKUP_BACKOFF;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.members.get(conversation_id).await {
                Ok(members) => return Ok(Some(members)),
                Err(RoutingError::NotFound(_)) => {
                    tracing::warn!(conversation_id, "no conversation for fan-out");
                    return Ok(None);
                }
                Err(e) => {
                    self.metrics.route_failures.inc();
                    if attempt == 1 || attempt.is_multiple_of(10) {
                        tracing::warn!(conversation_id, attempt, error = %e, "member lookup for fan-out failed; retrying");
                    }
                    sleep_or_stop(backoff, stop).await?;
                    backoff = (backoff * 2).min(LOOKUP_BACKOFF_MAX);
                }
            }
        }
    }

    fn holding_off(&self) -> bool {
        let hold = self
            .presence_hold_off
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        hold.is_some_and(|until| tokio::time::Instant::now() < until)
    }

    fn hold_off(&self) {
        *self
            .presence_hold_off
            .lock()
            .unwrap_or_else(|p| p.into_inner()) =
            Some(tokio::time::Instant::now() + PRESENCE_HOLD_OFF);
    }

    /// Every known gateway (and those of `answer`), each with every user.
    fn superset(&self, users: Vec<String>, answer: &[GatewayRoute]) -> Vec<GatewayRoute> {
        let mut gateways = self.gateways.all();
        gateways.extend(answer.iter().map(|r| r.gateway_addr.clone()));
        gateways.sort();
        gateways.dedup();
        gateways
            .into_iter()
            .map(|gateway_addr| GatewayRoute {
                gateway_addr,
                user_ids: users.clone(),
            })
            .collect()
    }
}

async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> Result<(), Stopped> {
    tokio::select! {
        _ = tokio::time::sleep(d) => Ok(()),
        _ = stop.cancelled() => Err(Stopped),
    }
}

/// Readiness of the service: serving, not draining, and no partition owner stuck
/// on a failing storage.
pub(crate) struct Health {
    readiness: Readiness,
    serving: AtomicBool,
    failing: Vec<AtomicBool>,
    failing_count: AtomicUsize,
}

impl Health {
    pub fn new(readiness: Readiness, partitions: u32) -> Health {
        Health {
            readiness,
            serving: AtomicBool::new(false),
            failing: (0..partitions).map(|_| AtomicBool::new(false)).collect(),
            failing_count: AtomicUsize::new(0),
        }
    }

    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::SeqCst);
        self.update();
    }

    /// Record whether the owner of `partition` is failing to persist.
    pub fn set_failing(&self, partition: u32, failing: bool) {
        let Some(flag) = self.failing.get(partition as usize) else {
            return;
        };
        if flag.swap(failing, Ordering::SeqCst) != failing {
            if failing {
                self.failing_count.fetch_add(1, Ordering::SeqCst);
            } else {
                self.failing_count.fetch_sub(1, Ordering::SeqCst);
            }
            self.update();
        }
    }

    fn update(&self) {
        self.readiness.set(
            self.serving.load(Ordering::SeqCst) && self.failing_count.load(Ordering::SeqCst) == 0,
        );
    }
}
