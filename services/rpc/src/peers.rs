//! The services a process calls, and the one place that decides how it reaches them.
//!
//! Every peer service is reached through an API handle ([`StorageApi`],
//! [`RoutingApi`], [`PresenceApi`], [`PresenceInterestApi`], [`GatewayApi`]) whose
//! methods are those of the service's gRPC contract (same request, response and
//! status codes). A handle is either
//! - **remote**: a tonic client on a lazily connected [`Channel`] (credential,
//!   timeouts and message limits as for every internal call), or
//! - **local**: the service's own implementation (its generated server trait) in
//!   this process, called directly: no protobuf encoding, no HTTP/2, no socket. The
//!   request (with its metadata, so trace context still propagates) is handed to the
//!   implementation as it is, under the same `cluster.rpc_timeout_ms` a remote call
//!   has.
//!
//! [`Peers::remote`] builds the handles of a process that runs one service (from
//! `cluster.*_url`); [`Peers::in_process`] those of a process that runs the services
//! side by side (standalone), where each service registers its implementation with
//! the matching `provide_*` call when it starts. A call to a local service that has
//! not registered yet fails with `unavailable`, as a call to a peer that is not up
//! yet does. Gateways are reached by the URL they advertise ([`GatewayPool`]): the
//! gateway of this process locally, any other over gRPC.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use switchboard_config::ClusterConfig;
use switchboard_proto::v1;

use crate::{channel, Channel, MessageLimits as _};

/// A service implementation in this process, filled in when the service starts.
type Slot<S> = Arc<OnceLock<Arc<S>>>;

enum Target<S: ?Sized, C> {
    Local {
        slot: Slot<S>,
        timeout: Duration,
        name: &'static str,
    },
    Remote(C),
}

// By hand: a derive would require `S: Clone`, and `S` is a trait object.
impl<S: ?Sized, C: Clone> Clone for Target<S, C> {
    fn clone(&self) -> Self {
        match self {
            Target::Local {
                slot,
                timeout,
                name,
            } => Target::Local {
                slot: slot.clone(),
                timeout: *timeout,
                name,
            },
            Target::Remote(client) => Target::Remote(client.clone()),
        }
    }
}

/// The implementation behind a local target, or `unavailable` before it started.
fn started<S: ?Sized>(slot: &Slot<S>, name: &'static str) -> Result<Arc<S>, tonic::Status> {
    slot.get().cloned().ok_or_else(|| {
        tonic::Status::unavailable(format!("the {name} service of this process is not started"))
    })
}

/// A local call under the timeout a remote call has; an expired call fails as tonic
/// reports an expired remote one (`cancelled`, "Timeout expired").
async fn bounded<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(tonic::Status::cancelled("Timeout expired")),
    }
}

macro_rules! api {
    (
        $(#[$doc:meta])*
        $api:ident, $name:literal, $server:ident :: $service:ident, $client:ident :: $client_ty:ident,
        { $($method:ident ( $req:ident ) -> $resp:ident;)* }
    ) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $api(Target<dyn v1::$server::$service, v1::$client::$client_ty<Channel>>);

        impl $api {
            /// Over gRPC on `channel`, with the cluster's message limits.
            pub fn remote(channel: Channel, cluster: &ClusterConfig) -> $api {
                $api(Target::Remote(
                    v1::$client::$client_ty::new(channel).message_limits(cluster),
                ))
            }

            /// Over gRPC to `url`.
            pub fn connect(url: &str, cluster: &ClusterConfig) -> anyhow::Result<$api> {
                Ok($api::remote(channel(url, cluster)?, cluster))
            }

            /// Directly to an implementation in this process.
            pub fn local(service: Arc<dyn v1::$server::$service>, cluster: &ClusterConfig) -> $api {
                let slot: Slot<dyn v1::$server::$service> = Arc::new(OnceLock::new());
                let _ = slot.set(service);
                $api::slot(slot, cluster)
            }

            fn slot(slot: Slot<dyn v1::$server::$service>, cluster: &ClusterConfig) -> $api {
                $api(Target::Local {
                    slot,
                    timeout: Duration::from_millis(cluster.rpc_timeout_ms),
                    name: $name,
                })
            }

            /// Whether calls stay in this process.
            pub fn is_local(&self) -> bool {
                matches!(self.0, Target::Local { .. })
            }

            $(
                pub async fn $method(
                    &self,
                    request: impl tonic::IntoRequest<v1::$req>,
                ) -> Result<tonic::Response<v1::$resp>, tonic::Status> {
                    match &self.0 {
                        Target::Local { slot, timeout, name } => {
                            let service = started(slot, name)?;
                            bounded(*timeout, service.$method(request.into_request())).await
                        }
                        Target::Remote(client) => client.clone().$method(request).await,
                    }
                }
            )*
        }
    };
}

api!(
    /// Calls of the storage service.
    StorageApi, "storage", storage_server::Storage, storage_client::StorageClient, {
        create_conversation(CreateConversationRequest) -> Conversation;
        get_conversation(GetConversationRequest) -> Conversation;
        change_members(ChangeMembersRequest) -> Conversation;
        list_conversations(ListConversationsRequest) -> ConversationListResult;
        last_seq(LastSeqRequest) -> LastSeqResponse;
        append(AppendRequest) -> AppendResponse;
        append_batch(AppendBatchRequest) -> AppendBatchResponse;
        lookup_dedupe(LookupDedupeRequest) -> LookupDedupeResponse;
        history(StorageHistoryRequest) -> HistoryResult;
        sync(StorageSyncRequest) -> SyncResult;
        set_read_marker(SetReadMarkerRequest) -> ReadMarker;
        authorize(AuthorizeRequest) -> AuthorizeResponse;
        thread(StorageThreadRequest) -> ThreadResult;
        receipts(StorageReceiptsRequest) -> ReceiptsResult;
        set_notification(SetNotificationRequest) -> SetNotificationResponse;
        notification_targets(NotificationTargetsRequest) -> NotificationTargetsResponse;
        shared_contacts(SharedContactsRequest) -> SharedContactsResponse;
        put_webhook(PutWebhookRequest) -> Webhook;
        list_webhooks(ListWebhooksRequest) -> ListWebhooksResponse;
        delete_webhook(DeleteWebhookRequest) -> DeleteWebhookResponse;
        advance_webhook(AdvanceWebhookRequest) -> Webhook;
    }
);

api!(
    /// Calls of the routing service.
    RoutingApi, "routing", routing_server::Routing, routing_client::RoutingClient, {
        send(RouteSendRequest) -> SendResult;
        publish(PublishRequest) -> PublishResponse;
    }
);

api!(
    /// Calls of the presence service.
    PresenceApi, "presence", presence_server::Presence, presence_client::PresenceClient, {
        register_session(RegisterSessionRequest) -> RegisterSessionResponse;
        unregister_session(UnregisterSessionRequest) -> UnregisterSessionResponse;
        heartbeat(HeartbeatRequest) -> HeartbeatResponse;
        set_status(SetStatusRequest) -> SetStatusResponse;
        query(QueryRequest) -> QueryResponse;
        watch(WatchRequest) -> QueryResponse;
        route(RouteRequest) -> RouteResponse;
        drop_gateway(DropGatewayRequest) -> DropGatewayResponse;
    }
);

api!(
    /// Calls of presence's conversation routes (served beside [`PresenceApi`]).
    PresenceInterestApi, "presence", presence_interest_server::PresenceInterest,
    presence_interest_client::PresenceInterestClient, {
        route_conversation(RouteConversationRequest) -> RouteResponse;
    }
);

api!(
    /// Calls of one gateway.
    GatewayApi, "gateway", gateway_server::Gateway, gateway_client::GatewayClient, {
        deliver(DeliverRequest) -> DeliverResponse;
        drain(DrainRequest) -> DrainResponse;
    }
);

/// Gateways by the URL they advertise, reached on first use and shared afterwards;
/// the gateway of this process (if it registered) is called locally.
#[derive(Clone)]
pub struct GatewayPool {
    cluster: ClusterConfig,
    // A std mutex is right here: the critical section is a map lookup or insert,
    // never held across an await.
    gateways: Arc<Mutex<HashMap<String, GatewayApi>>>,
}

impl GatewayPool {
    pub fn new(cluster: ClusterConfig) -> Self {
        GatewayPool {
            cluster,
            gateways: Default::default(),
        }
    }

    /// The gateway advertising `url`.
    pub fn get(&self, url: &str) -> anyhow::Result<GatewayApi> {
        let mut gateways = self.gateways.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(gateway) = gateways.get(url) {
            return Ok(gateway.clone());
        }
        let gateway = GatewayApi::connect(url, &self.cluster)?;
        gateways.insert(url.to_owned(), gateway.clone());
        Ok(gateway)
    }

    /// Forget a remote gateway (for example one that went away); the local one stays.
    pub fn remove(&self, url: &str) {
        let mut gateways = self.gateways.lock().unwrap_or_else(|p| p.into_inner());
        if gateways.get(url).is_some_and(|g| !g.is_local()) {
            gateways.remove(url);
        }
    }

    /// Call the gateway advertising `url` in this process from now on.
    fn set_local(&self, url: &str, gateway: GatewayApi) {
        self.gateways
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(url.to_owned(), gateway);
    }
}

/// The peer services of one process. Clones share everything.
#[derive(Clone)]
pub struct Peers {
    pub storage: StorageApi,
    pub routing: RoutingApi,
    pub presence: PresenceApi,
    pub interest: PresenceInterestApi,
    pub gateways: GatewayPool,
    local: Option<Arc<LocalSlots>>,
}

/// Where the services of an in-process [`Peers`] register.
struct LocalSlots {
    storage: Slot<dyn v1::storage_server::Storage>,
    routing: Slot<dyn v1::routing_server::Routing>,
    presence: Slot<dyn v1::presence_server::Presence>,
    interest: Slot<dyn v1::presence_interest_server::PresenceInterest>,
}

impl Peers {
    /// Every peer over gRPC at its `cluster.*_url`.
    pub fn remote(cluster: &ClusterConfig) -> anyhow::Result<Peers> {
        let presence = channel(&cluster.presence_url, cluster)?;
        Ok(Peers {
            storage: StorageApi::connect(&cluster.storage_url, cluster)?,
            routing: RoutingApi::connect(&cluster.routing_url, cluster)?,
            interest: PresenceInterestApi::remote(presence.clone(), cluster),
            presence: PresenceApi::remote(presence, cluster),
            gateways: GatewayPool::new(cluster.clone()),
            local: None,
        })
    }

    /// Storage, routing and presence in this process (each registers with its
    /// `provide_*` call as it starts); gateways over gRPC except one registered with
    /// [`Peers::provide_gateway`].
    pub fn in_process(cluster: &ClusterConfig) -> Peers {
        let slots = LocalSlots {
            storage: Default::default(),
            routing: Default::default(),
            presence: Default::default(),
            interest: Default::default(),
        };
        Peers {
            storage: StorageApi::slot(slots.storage.clone(), cluster),
            routing: RoutingApi::slot(slots.routing.clone(), cluster),
            presence: PresenceApi::slot(slots.presence.clone(), cluster),
            interest: PresenceInterestApi::slot(slots.interest.clone(), cluster),
            gateways: GatewayPool::new(cluster.clone()),
            local: Some(Arc::new(slots)),
        }
    }

    /// Whether the services run in this process (their calls stay local).
    pub fn is_in_process(&self) -> bool {
        self.local.is_some()
    }

    /// The storage implementation of this process (ignored by remote peers: their
    /// callers reach storage over gRPC). Only the first registration counts.
    pub fn provide_storage(&self, service: Arc<dyn v1::storage_server::Storage>) {
        if let Some(local) = &self.local {
            let _ = local.storage.set(service);
        }
    }

    /// The routing implementation of this process (see [`Peers::provide_storage`]).
    pub fn provide_routing(&self, service: Arc<dyn v1::routing_server::Routing>) {
        if let Some(local) = &self.local {
            let _ = local.routing.set(service);
        }
    }

    /// The presence implementations of this process (see [`Peers::provide_storage`]).
    pub fn provide_presence(
        &self,
        presence: Arc<dyn v1::presence_server::Presence>,
        interest: Arc<dyn v1::presence_interest_server::PresenceInterest>,
    ) {
        if let Some(local) = &self.local {
            let _ = local.presence.set(presence);
            let _ = local.interest.set(interest);
        }
    }

    /// The gateway of this process, advertising `url`: deliveries to that URL stay
    /// in the process (only for in-process peers).
    pub fn provide_gateway(
        &self,
        url: &str,
        service: Arc<dyn v1::gateway_server::Gateway>,
        cluster: &ClusterConfig,
    ) {
        if self.local.is_some() {
            self.gateways
                .set_local(url, GatewayApi::local(service, cluster));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct EchoRouting;

    #[tonic::async_trait]
    impl v1::routing_server::Routing for EchoRouting {
        async fn send(
            &self,
            request: tonic::Request<v1::RouteSendRequest>,
        ) -> Result<tonic::Response<v1::SendResult>, tonic::Status> {
            let traced = request.metadata().get("traceparent").is_some();
            let request = request.into_inner();
            Ok(tonic::Response::new(v1::SendResult {
                seq: request.accepted_at_ms + u64::from(traced),
                ..Default::default()
            }))
        }

        async fn publish(
            &self,
            _request: tonic::Request<v1::PublishRequest>,
        ) -> Result<tonic::Response<v1::PublishResponse>, tonic::Status> {
            std::future::pending().await
        }
    }

    fn cluster(timeout_ms: u64) -> ClusterConfig {
        ClusterConfig {
            rpc_timeout_ms: timeout_ms,
            ..ClusterConfig::default()
        }
    }

    #[tokio::test]
    async fn a_local_call_reaches_the_registered_implementation_with_its_metadata() {
        let peers = Peers::in_process(&cluster(1_000));
        let request = || v1::RouteSendRequest {
            accepted_at_ms: 41,
            ..Default::default()
        };
        let before = peers.routing.send(request()).await.unwrap_err();
        assert_eq!(before.code(), tonic::Code::Unavailable, "{before:?}");
        peers.provide_routing(Arc::new(EchoRouting));
        let mut call = tonic::Request::new(request());
        call.metadata_mut()
            .insert("traceparent", "00-0-0-01".parse().unwrap());
        let reply = peers.routing.send(call).await.unwrap().into_inner();
        assert_eq!(
            reply.seq, 42,
            "the request and its metadata arrive unchanged"
        );
        assert!(peers.routing.is_local());
    }

    #[tokio::test]
    async fn a_local_call_is_bounded_by_the_rpc_timeout() {
        let peers = Peers::in_process(&cluster(50));
        peers.provide_routing(Arc::new(EchoRouting));
        let status = peers
            .routing
            .publish(v1::PublishRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Cancelled, "{status:?}");
    }

    #[tokio::test]
    async fn remote_peers_ignore_local_implementations() {
        let cluster = ClusterConfig {
            routing_url: "http://127.0.0.1:1".into(),
            ..cluster(1_000)
        };
        let peers = Peers::remote(&cluster).unwrap();
        peers.provide_routing(Arc::new(EchoRouting));
        assert!(!peers.routing.is_local());
        let status = peers
            .routing
            .send(v1::RouteSendRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }

    struct NoGateway;

    #[tonic::async_trait]
    impl v1::gateway_server::Gateway for NoGateway {
        async fn deliver(
            &self,
            request: tonic::Request<v1::DeliverRequest>,
        ) -> Result<tonic::Response<v1::DeliverResponse>, tonic::Status> {
            Ok(tonic::Response::new(v1::DeliverResponse {
                absent: request
                    .into_inner()
                    .deliveries
                    .into_iter()
                    .flat_map(|d| d.recipients)
                    .collect(),
                ..Default::default()
            }))
        }

        async fn drain(
            &self,
            _request: tonic::Request<v1::DrainRequest>,
        ) -> Result<tonic::Response<v1::DrainResponse>, tonic::Status> {
            Ok(tonic::Response::new(v1::DrainResponse::default()))
        }
    }

    #[tokio::test]
    async fn the_local_gateway_is_called_by_its_url_and_stays() {
        let cluster = cluster(1_000);
        let peers = Peers::in_process(&cluster);
        let url = "http://127.0.0.1:1";
        assert!(!peers.gateways.get(url).unwrap().is_local());
        peers.provide_gateway(url, Arc::new(NoGateway), &cluster);
        peers.gateways.remove(url);
        let gateway = peers.gateways.get(url).unwrap();
        assert!(gateway.is_local());
        let reply = gateway
            .deliver(v1::DeliverRequest {
                deliveries: vec![v1::Delivery {
                    recipients: vec!["alice".into()],
                    ..Default::default()
                }],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.absent, vec!["alice".to_string()]);
        assert!(!peers.gateways.get("http://127.0.0.1:2").unwrap().is_local());
    }
}
