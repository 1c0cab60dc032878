//! What the gRPC handlers and the partition owners share: peers, caches, the log,
//! the fan-out queues, metrics and health.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchboard_config::Config;
use switchboard_proto::timeline::kinds;
use switchboard_proto::v1::presence_client::PresenceClient;
use switchboard_proto::v1::presence_interest_client::PresenceInterestClient;
use switchboard_proto::v1::server_frame::Event;
use switchboard_proto::v1::storage_client::StorageClient;
use switchboard_proto::v1::{
    Delivery, GatewayRoute, Message, MessageEvent, RouteConversationRequest, RouteRequest,
    ServerFrame,
};
use switchboard_rpc::Channel;
use switchboard_telemetry::Readiness;

use crate::error::RoutingError;
use crate::eventlog::EventLog;
use crate::fanout::Fanout;
use crate::members::MemberCache;
use crate::metrics::Metrics;
use crate::waiters::Waiters;
use crate::webhooks::WebhookWake;

/// Attempts of a presence Route call during fan-out.
const ROUTE_ATTEMPTS: u32 = 3;

pub(crate) struct Node {
    pub config: Arc<Config>,
    pub log: Arc<dyn EventLog>,
    pub storage: StorageClient<Channel>,
    pub presence: PresenceClient<Channel>,
    /// Presence's cached per-conversation routes (the interest index).
    pub interest: PresenceInterestClient<Channel>,
    /// False once presence answered `unimplemented` (an older presence): fan-out then
    /// routes every member with `Route`.
    pub interest_supported: AtomicBool,
    pub members: MemberCache,
    pub waiters: Arc<Waiters>,
    pub fanout: Fanout,
    /// Wakes the webhook dispatchers of a conversation when its owner persisted.
    pub webhooks: WebhookWake,
    pub metrics: Arc<Metrics>,
    pub health: Health,
}

impl Node {
    /// Where `users` have live sessions.
    pub async fn route(&self, users: &[String]) -> Result<Vec<GatewayRoute>, RoutingError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        self.presence
            .clone()
            .route(RouteRequest {
                user_ids: users.to_vec(),
            })
            .await
            .map(|r| r.into_inner().routes)
            .map_err(|st| RoutingError::peer("presence Route", &st))
    }

    /// Where the members of a conversation have live sessions, from presence's
    /// interest index: for a hot conversation one cached lookup however many members
    /// it has, instead of one lookup per member.
    pub async fn route_conversation(
        &self,
        conversation_id: &str,
        members: &[String],
    ) -> Result<Vec<GatewayRoute>, RoutingError> {
        if members.is_empty() {
            return Ok(Vec::new());
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
            Ok(r) => Ok(r.into_inner().routes),
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
    pub async fn fan_out_message(&self, message: &Message) {
        let members = match self.members.get(&message.conversation_id).await {
            Ok(m) => m,
            Err(e) => {
                self.metrics.route_failures.inc();
                tracing::warn!(conversation_id = %message.conversation_id, seq = message.seq, error = %e, "no members for fan-out; clients will sync");
                return;
            }
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
        let mut backoff = Duration::from_millis(20);
        let mut routes = None;
        for attempt in 1..=ROUTE_ATTEMPTS {
            let routed = if outsiders.is_empty() {
                self.route_conversation(&message.conversation_id, members.as_slice())
                    .await
            } else {
                let mut users = members.as_slice().to_vec();
                users.extend(outsiders.iter().cloned());
                self.route(&users).await
            };
            match routed {
                Ok(r) => {
                    routes = Some(r);
                    break;
                }
                Err(e) => {
                    tracing::warn!(conversation_id = %message.conversation_id, attempt, error = %e, "route failed");
                    if attempt < ROUTE_ATTEMPTS {
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                }
            }
        }
        let Some(routes) = routes else {
            // Persisted but not delivered live: online clients catch up with sync.
            self.metrics.route_failures.inc();
            return;
        };
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
            };
            self.fanout
                .enqueue_ordered(&route.gateway_addr, delivery)
                .await;
        }
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
