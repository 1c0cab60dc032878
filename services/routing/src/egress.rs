//! Where outgoing webhook requests may go.
//!
//! A webhook URL is chosen by a conversation's admin, so without a guard any member
//! with that role could make the cluster POST to its own internals (the Kubernetes API,
//! a cloud metadata endpoint on 169.254.169.254, Redis on loopback). Unless
//! `routing.webhook_allow_private_networks` is set, only globally routable addresses
//! are connected to: the check applies to the addresses a host name resolves to (in
//! the resolver the connector uses, so a name that re-resolves to a private address
//! between checks is still refused) and to IP literals in the URL (which the
//! connector does not resolve).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};

/// Whether `ip` is an address a webhook may be sent to when private networks are not
/// allowed: not loopback, private (RFC 1918, unique local), link-local (incl. cloud
/// metadata), shared (CGNAT), unspecified, multicast, broadcast or documentation
/// ranges; IPv4-mapped and -compatible IPv6 addresses are judged as IPv4.
pub(crate) fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        // 100.64.0.0/10, shared address space (carrier-grade NAT, often cluster-internal).
        || (a == 100 && (64..128).contains(&b))
        // 192.0.0.0/24, protocol assignments.
        || (a == 192 && b == 0 && c == 0)
        // 198.18.0.0/15, benchmarking.
        || (a == 198 && (b == 18 || b == 19))
        // 240.0.0.0/4, reserved.
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        // fc00::/7 unique local.
        || (first & 0xfe00) == 0xfc00
        // fe80::/10 link-local.
        || (first & 0xffc0) == 0xfe80
        // 2001:db8::/32 documentation.
        || (first == 0x2001 && ip.segments()[1] == 0x0db8)
        // ::/96 IPv4-compatible (deprecated) and other addresses in ::/8.
        || first == 0)
}

/// The system resolver, keeping only the addresses webhooks may go to.
#[derive(Clone)]
pub(crate) struct GuardedResolver {
    inner: GaiResolver,
    allow_private: bool,
}

impl GuardedResolver {
    pub fn new(allow_private: bool) -> GuardedResolver {
        GuardedResolver {
            inner: GaiResolver::new(),
            allow_private,
        }
    }
}

type Resolving =
    Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, std::io::Error>> + Send>>;

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Resolving;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        let resolving = self.inner.call(name);
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = resolving.await?.collect();
            let allowed: Vec<SocketAddr> = addrs
                .iter()
                .copied()
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            if allowed.is_empty() && !addrs.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "{host} resolves only to private addresses, which \
                         routing.webhook_allow_private_networks does not allow"
                    ),
                ));
            }
            Ok(allowed.into_iter())
        })
    }
}

/// Refuse a URL whose host is an IP literal webhooks may not go to (names are
/// checked by [`GuardedResolver`] when they are resolved).
pub(crate) fn check_literal(url: &str, allow_private: bool) -> Result<(), String> {
    if allow_private {
        return Ok(());
    }
    let uri: http::Uri = url.parse().map_err(|e| format!("bad url: {e}"))?;
    let host = uri.host().unwrap_or_default();
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    match literal.parse::<IpAddr>() {
        Ok(ip) if !is_public(ip) => Err(format!(
            "{ip} is a private address, which routing.webhook_allow_private_networks does not allow"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_loopback_link_local_and_metadata_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(!is_public(ip), "{ip} must not count as public");
        }
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(is_public(ip), "{ip} is public");
        }
    }

    #[test]
    fn literal_urls_are_checked_unless_private_networks_are_allowed() {
        assert!(check_literal("http://127.0.0.1:8080/hook", false).is_err());
        assert!(check_literal("http://[::1]:8080/hook", false).is_err());
        assert!(check_literal("https://169.254.169.254/latest", false).is_err());
        assert!(check_literal("https://93.184.216.34/hook", false).is_ok());
        // Names are left to the resolver.
        assert!(check_literal("https://hooks.example.com/x", false).is_ok());
        assert!(check_literal("http://127.0.0.1:8080/hook", true).is_ok());
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_of_private_addresses() {
        use tower_service::Service as _;
        let mut guarded = GuardedResolver::new(false);
        let name: Name = "localhost".parse().unwrap();
        let refused = guarded.call(name.clone()).await;
        assert_eq!(
            refused.err().map(|e| e.kind()),
            Some(std::io::ErrorKind::PermissionDenied)
        );
        let mut open = GuardedResolver::new(true);
        let addrs: Vec<SocketAddr> = open.call(name).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }
}
