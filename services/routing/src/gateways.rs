//! The gateways this routing instance has seen in routes: the safe superset that
//! fan-out delivers to when presence cannot say where the members are.
//!
//! Every route presence answers names gateways; each is remembered with when it was
//! last named, for [`KNOWN_FOR`]. When presence is unreachable, or answers `partial`
//! (it lost its state and gateways are registering their sessions again), a
//! sequenced message goes to every gateway remembered, with every member as a
//! recipient: each gateway delivers to the sessions it holds and reports the rest
//! absent. A gateway that started during the outage and was never named is not
//! known; its sessions are told to sync by that gateway once presence answers again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use switchboard_proto::v1::GatewayRoute;
use tokio::time::Instant;

/// How long a gateway stays known after presence last named it.
pub(crate) const KNOWN_FOR: Duration = Duration::from_secs(600);
/// Most gateways remembered; past it the longest unnamed is forgotten.
pub(crate) const MAX_KNOWN: usize = 4_096;

#[derive(Default)]
pub(crate) struct KnownGateways {
    /// Gateway URL -> when a route last named it. A std mutex: map operations only.
    seen: Mutex<HashMap<String, Instant>>,
}

impl KnownGateways {
    /// Remember the gateways of `routes`.
    pub fn note(&self, routes: &[GatewayRoute]) {
        if routes.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut seen = self.lock();
        for route in routes {
            match seen.get_mut(&route.gateway_addr) {
                Some(at) => *at = now,
                None => {
                    if seen.len() >= MAX_KNOWN {
                        seen.retain(|_, at| now.saturating_duration_since(*at) < KNOWN_FOR);
                    }
                    if seen.len() >= MAX_KNOWN {
                        if let Some(oldest) = seen
                            .iter()
                            .min_by_key(|(_, at)| **at)
                            .map(|(g, _)| g.clone())
                        {
                            seen.remove(&oldest);
                        }
                    }
                    seen.insert(route.gateway_addr.clone(), now);
                }
            }
        }
    }

    /// The gateways named within [`KNOWN_FOR`], sorted.
    pub fn all(&self) -> Vec<String> {
        let now = Instant::now();
        let mut seen = self.lock();
        seen.retain(|_, at| now.saturating_duration_since(*at) < KNOWN_FOR);
        let mut out: Vec<String> = seen.keys().cloned().collect();
        out.sort();
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(gateway: &str) -> GatewayRoute {
        GatewayRoute {
            gateway_addr: gateway.into(),
            user_ids: vec!["u".into()],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn gateways_named_in_routes_are_known_until_unnamed_for_long() {
        let known = KnownGateways::default();
        assert!(known.all().is_empty());
        known.note(&[route("http://b"), route("http://a")]);
        assert_eq!(known.all(), vec!["http://a", "http://b"]);
        tokio::time::advance(KNOWN_FOR / 2).await;
        known.note(&[route("http://a")]);
        tokio::time::advance(KNOWN_FOR / 2 + Duration::from_secs(1)).await;
        assert_eq!(
            known.all(),
            vec!["http://a"],
            "b was not named for too long"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_max_known_gateways_are_remembered() {
        let known = KnownGateways::default();
        for i in 0..MAX_KNOWN + 10 {
            known.note(&[route(&format!("http://g{i}"))]);
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        let all = known.all();
        assert_eq!(all.len(), MAX_KNOWN);
        assert!(
            !all.contains(&"http://g0".to_owned()),
            "the oldest went first"
        );
        assert!(all.contains(&format!("http://g{}", MAX_KNOWN + 9)));
    }
}
