//! The interest index on Redis (layout and race argument in the parent module's
//! documentation, section "Interest index").

use std::collections::{BTreeSet, HashMap};

use switchboard_proto::v1::GatewayRoute;

use super::{session_gateways, Inner};
use crate::error::PresenceError;
use crate::store::interest::{
    distinct, members_fingerprint, routes_from, ConversationRoutes, INTEREST_TTL,
};

/// Real-time TTL of the interest keys (`routes`, `gen`, `convs`): twice the entry's
/// validity, so Redis reclaims them well after they stopped answering (validity is
/// judged on the store clock, see [`Inner::read_interest`]).
fn key_ttl_ms() -> u64 {
    2 * INTEREST_TTL.as_millis() as u64
}

/// Most conversations invalidated per pipeline.
const INVALIDATE_CHUNK: usize = 500;

/// A conversation's cached entry as read, with the generation of its invalidations.
pub(super) struct Cached {
    fields: HashMap<String, String>,
    /// Generation ("0" when never invalidated or forgotten).
    pub gen: String,
}

impl Cached {
    /// The routes when the entry was computed from the member set with `fingerprint`
    /// and is still valid at `now_ms`.
    fn answer(
        &self,
        fingerprint: &str,
        now_ms: i64,
    ) -> Result<Option<Vec<GatewayRoute>>, PresenceError> {
        let valid = self.fields.get("fp").map(String::as_str) == Some(fingerprint)
            && self
                .fields
                .get("exp")
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|exp| now_ms < exp);
        if !valid {
            return Ok(None);
        }
        let mut routes = Vec::new();
        for (field, packed) in &self.fields {
            let Some(gateway) = field.strip_prefix("g:") else {
                continue;
            };
            let user_ids: Vec<String> = serde_json::from_str(packed)
                .map_err(|e| PresenceError::Internal(format!("bad cached routes: {e}")))?;
            routes.push(GatewayRoute {
                gateway_addr: gateway.to_owned(),
                user_ids,
            });
        }
        routes.sort_by(|a, b| a.gateway_addr.cmp(&b.gateway_addr));
        Ok(Some(routes))
    }
}

impl Inner {
    /// See [`SessionStore::route_conversation`](crate::store::SessionStore::route_conversation).
    ///
    /// Hit: one round trip (the entry and its generation). Miss: that, one pipeline
    /// that per member records the interest and reads the user hash, and one script
    /// that stores the entry unless it was invalidated in between.
    pub(super) async fn route_conversation(
        &self,
        conversation_id: &str,
        member_ids: &[String],
    ) -> Result<ConversationRoutes, PresenceError> {
        let fingerprint = format!("{:032x}", members_fingerprint(member_ids));
        let now = self.clock.now_ms();
        let cached = self.read_interest(conversation_id).await?;
        if let Some(routes) = cached.answer(&fingerprint, now)? {
            return Ok(ConversationRoutes {
                routes,
                cached: true,
            });
        }
        let expires_at_ms = now + INTEREST_TTL.as_millis() as i64;
        let routes = self
            .compute_routes(conversation_id, member_ids, expires_at_ms)
            .await?;
        self.store_interest(
            conversation_id,
            &cached.gen,
            &fingerprint,
            expires_at_ms,
            &routes,
        )
        .await?;
        Ok(ConversationRoutes {
            routes,
            cached: false,
        })
    }

    /// Read a conversation's entry and generation (one tag, one round trip).
    pub(super) async fn read_interest(
        &self,
        conversation_id: &str,
    ) -> Result<Cached, PresenceError> {
        let mut pipe = redis::pipe();
        pipe.hgetall(self.keys.routes(conversation_id))
            .get(self.keys.routes_gen(conversation_id));
        let (fields, gen): (HashMap<String, String>, Option<String>) =
            self.pipe("route_conversation", &pipe).await?;
        Ok(Cached {
            fields,
            gen: gen.unwrap_or_else(|| "0".to_owned()),
        })
    }

    /// Record in each member's `convs` that an entry listing them may live until
    /// `expires_at_ms`, THEN read their user hash (same tag, so in this order even on
    /// Redis Cluster), and build the routes.
    pub(super) async fn compute_routes(
        &self,
        conversation_id: &str,
        member_ids: &[String],
        expires_at_ms: i64,
    ) -> Result<Vec<GatewayRoute>, PresenceError> {
        let members = distinct(member_ids);
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let ttl = key_ttl_ms();
        let mut pipe = redis::pipe();
        for member in &members {
            let convs = self.keys.interest(member);
            pipe.zadd(&convs, conversation_id, expires_at_ms)
                .ignore()
                .pexpire(&convs, ttl as i64)
                .ignore()
                .hgetall(self.keys.user(member));
        }
        let hashes: Vec<HashMap<String, String>> = self.pipe("route_conversation", &pipe).await?;
        let mut pairs: Vec<(&str, String)> = Vec::new();
        for (member, hash) in members.iter().zip(&hashes) {
            for gateway in session_gateways(hash)? {
                pairs.push((member.as_str(), gateway));
            }
        }
        Ok(routes_from(pairs.iter().map(|(u, g)| (*u, g.as_str()))))
    }

    /// Store an entry computed after reading generation `gen`; false when the entry
    /// was invalidated since (then it is not cached).
    pub(super) async fn store_interest(
        &self,
        conversation_id: &str,
        gen: &str,
        fingerprint: &str,
        expires_at_ms: i64,
        routes: &[GatewayRoute],
    ) -> Result<bool, PresenceError> {
        let mut args = vec![
            gen.to_owned(),
            fingerprint.to_owned(),
            expires_at_ms.to_string(),
            key_ttl_ms().to_string(),
        ];
        for route in routes {
            let packed = serde_json::to_string(&route.user_ids)
                .map_err(|e| PresenceError::Internal(format!("cannot pack routes: {e}")))?;
            args.push(route.gateway_addr.clone());
            args.push(packed);
        }
        let stored: i64 = self
            .script(
                "route_conversation",
                &self.scripts.conv_store,
                &[
                    self.keys.routes(conversation_id),
                    self.keys.routes_gen(conversation_id),
                ],
                &args,
            )
            .await?;
        if stored == 0 {
            tracing::debug!(
                conversation_id,
                "conversation routes changed while computed; answered without caching"
            );
        }
        Ok(stored == 1)
    }

    /// Drop the cached entries of `conversations` and bump their generations.
    pub(super) async fn invalidate_interest(
        &self,
        op: &str,
        conversations: &BTreeSet<&str>,
    ) -> Result<(), PresenceError> {
        let ttl = key_ttl_ms();
        let conversations: Vec<&str> = conversations.iter().copied().collect();
        for chunk in conversations.chunks(INVALIDATE_CHUNK) {
            let mut pipe = redis::pipe();
            for conversation_id in chunk {
                let mut inv = self.scripts.conv_invalidate.prepare_invoke();
                inv.key(self.keys.routes(conversation_id))
                    .key(self.keys.routes_gen(conversation_id))
                    .arg(ttl);
                pipe.invoke_script(&inv);
            }
            let dropped: Vec<i64> = self.pipe(op, &pipe).await?;
            self.metrics
                .interest_invalidations
                .inc_by(dropped.iter().sum::<i64>().max(0) as u64);
        }
        Ok(())
    }
}
