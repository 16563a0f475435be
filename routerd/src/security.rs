//! Who may call what, and which worker addresses the router may be pointed at
//! (docs/security.md).
//!
//! - Inference and model-info routes need `--api-key` when one is set; health and liveness
//!   stay open for probes.
//! - Management and admin routes need `--admin-api-key` when one is set, else `--api-key` when
//!   that is set (as in sgl-router); with neither, changes (anything but GET/HEAD) are taken
//!   only from loopback peers.
//! - Workers added through the API or found by discovery must be plain `http(s)://host:port`
//!   URLs whose addresses are not link-local or cloud metadata endpoints, and within
//!   `allowed_worker_networks` when that list is given.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use axum::http::{HeaderMap, Method};
use ipnet::IpNet;

use crate::config::SecurityConfig;
use crate::error::RouterError;

/// What a route is, for access control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health and liveness probes: always open.
    Open,
    /// Inference and model information: the client API key.
    Client,
    /// Worker management and `/admin/*`: the admin key, or loopback for changes.
    Admin,
}

pub fn access(path: &str) -> Access {
    match path {
        "/health" | "/liveness" | "/readiness" | "/health_generate" => Access::Open,
        "/add_worker" | "/remove_worker" | "/list_workers" | "/get_loads" | "/flush_cache"
        | "/workers" => Access::Admin,
        p if p.starts_with("/workers/") || p.starts_with("/admin/") || p == "/admin" => {
            Access::Admin
        }
        _ => Access::Client,
    }
}

/// Whether the request may proceed: `Err` is the 401 or 403 to answer.
pub fn authorize(
    sec: &SecurityConfig,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<(), RouterError> {
    let bearer = || headers.get(axum::http::header::AUTHORIZATION).map(|v| v.as_bytes());
    match access(path) {
        Access::Open => Ok(()),
        Access::Client => match &sec.api_key {
            Some(key) if !key.matches_bearer(bearer()) => Err(RouterError::Unauthorized(
                "this route needs `Authorization: Bearer <api key>` (the router's --api-key)"
                    .into(),
            )),
            _ => Ok(()),
        },
        // As in sgl-router, the API key guards these routes when there is no admin key.
        Access::Admin => match (&sec.admin_api_key, &sec.api_key) {
            (Some(key), _) if !key.matches_bearer(bearer()) => Err(RouterError::Unauthorized(
                "management and admin routes need `Authorization: Bearer <admin key>` \
                 (the router's --admin-api-key)"
                    .into(),
            )),
            (None, Some(key)) if !key.matches_bearer(bearer()) => Err(RouterError::Unauthorized(
                "management and admin routes need `Authorization: Bearer <api key>` (the \
                     router's --api-key; set --admin-api-key for a separate admin key)"
                    .into(),
            )),
            (Some(_), _) | (None, Some(_)) => Ok(()),
            (None, None) if is_read(method) || is_loopback(peer.ip()) => Ok(()),
            (None, None) => Err(RouterError::Forbidden(format!(
                "{method} {path} changes the router: without an admin key (--admin-api-key) \
                 changes are accepted only from loopback, and this request came from {}",
                peer.ip()
            ))),
        },
    }
}

fn is_read(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Whether `host` is a loopback name or address (`server.host` for the startup warning).
pub fn host_is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(is_loopback)
}

/// What routerd says at startup about who can reach it.
pub fn startup_warnings(sec: &SecurityConfig, host: &str) -> Vec<String> {
    let mut out = Vec::new();
    if host_is_loopback(host) {
        return out;
    }
    if sec.admin_api_key.is_none() && sec.api_key.is_none() {
        out.push(format!(
            "listening on {host} beyond loopback without an admin key: management and admin \
             routes accept changes only from loopback peers (set --admin-api-key to manage \
             the router remotely)"
        ));
    }
    if sec.api_key.is_none() {
        out.push(format!(
            "listening on {host} beyond loopback without an API key: anyone who can reach \
             the port can send inference requests (set --api-key to require one)"
        ));
    }
    out
}

/// Host names of cloud metadata services.
const METADATA_HOSTS: [&str; 6] = [
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.azure.internal",
];

/// Why `ip` may not be a worker address, if it may not.
pub fn refuse_ip(ip: IpAddr, allowed: &[IpNet]) -> Option<String> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let why = match ip {
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address"),
        IpAddr::V4(v4) if v4 == Ipv4Addr::new(100, 100, 100, 200) => {
            Some("a cloud metadata address")
        }
        IpAddr::V4(v4) if v4.is_unspecified() || v4.octets()[0] == 0 => {
            Some("an unspecified address")
        }
        IpAddr::V4(v4) if v4.is_broadcast() || v4.is_multicast() => {
            Some("a broadcast or multicast address")
        }
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some("a link-local address"),
        IpAddr::V6(v6) if v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) => {
            Some("a cloud metadata address")
        }
        IpAddr::V6(v6) if v6.is_unspecified() => Some("an unspecified address"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("a multicast address"),
        _ => None,
    };
    if let Some(why) = why {
        return Some(format!("{ip} is {why}"));
    }
    if !allowed.is_empty() && !allowed.iter().any(|n| n.contains(&ip)) {
        let nets: Vec<String> = allowed.iter().map(|n| n.to_string()).collect();
        return Some(format!("{ip} is outside the allowed worker networks ({})", nets.join(", ")));
    }
    None
}

/// Splits a normalised worker URL (`http://host:port`) into host and port.
fn host_port(url: &str) -> Option<(String, u16)> {
    let uri: axum::http::Uri = url.parse().ok()?;
    let auth = uri.authority()?;
    let default = if uri.scheme_str() == Some("https") { 443 } else { 80 };
    let host = auth.host().trim_start_matches('[').trim_end_matches(']').to_owned();
    Some((host, auth.port_u16().unwrap_or(default)))
}

/// Checks a worker URL whose host is an address (what discovery produces); names are for
/// `check_worker_url`.
pub fn check_worker_addr(url: &str, allowed: &[IpNet]) -> Result<(), String> {
    let (host, _) = host_port(url).ok_or_else(|| format!("{url:?} is not a worker URL"))?;
    match host.parse::<IpAddr>() {
        Ok(ip) => refuse_ip(ip, allowed).map_or(Ok(()), |why| Err(format!("{url}: {why}"))),
        Err(_) => Err(format!("{url}: expected an IP address")),
    }
}

/// Checks a (normalised) worker URL given through the API: metadata host names are refused,
/// and every address the host resolves to must pass `refuse_ip`.
pub async fn check_worker_url(url: &str, allowed: &[IpNet]) -> Result<(), String> {
    let (host, port) = host_port(url).ok_or_else(|| format!("{url:?} is not a worker URL"))?;
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    if METADATA_HOSTS.contains(&name.as_str()) {
        return Err(format!("{url}: {host} is a cloud metadata service"));
    }
    if host.parse::<IpAddr>().is_ok() {
        return check_worker_addr(url, allowed);
    }
    let resolved = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::lookup_host((name.as_str(), port)),
    )
    .await
    .map_err(|_| format!("{url}: resolving {host} took longer than 5s"))?
    .map_err(|e| format!("{url}: cannot resolve {host}: {e}"))?;
    let mut any = false;
    for addr in resolved {
        any = true;
        if let Some(why) = refuse_ip(addr.ip(), allowed) {
            return Err(format!("{url}: {host} resolves to {why}"));
        }
    }
    if !any {
        return Err(format!("{url}: {host} resolves to no address"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn sec(api: Option<&str>, admin: Option<&str>) -> SecurityConfig {
        SecurityConfig {
            api_key: api.map(Secret::new),
            admin_api_key: admin.map(Secret::new),
            allowed_worker_networks: Vec::new(),
        }
    }

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert("authorization", a.parse().unwrap());
        }
        h
    }

    #[test]
    fn routes_are_classified() {
        for p in ["/health", "/liveness", "/readiness", "/health_generate"] {
            assert_eq!(access(p), Access::Open, "{p}");
        }
        for p in ["/generate", "/v1/chat/completions", "/v1/models", "/get_model_info", "/x"] {
            assert_eq!(access(p), Access::Client, "{p}");
        }
        for p in
            ["/workers", "/workers/http%3A%2F%2Fa", "/admin/config", "/add_worker", "/flush_cache"]
        {
            assert_eq!(access(p), Access::Admin, "{p}");
        }
    }

    #[test]
    fn keys_and_loopback_decide() {
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap();
        let remote: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let open = sec(None, None);
        assert!(authorize(&open, &Method::POST, "/generate", &headers(None), remote).is_ok());
        assert!(authorize(&open, &Method::GET, "/workers", &headers(None), remote).is_ok());
        assert!(authorize(&open, &Method::POST, "/workers", &headers(None), local).is_ok());
        assert!(authorize(&open, &Method::POST, "/workers", &headers(None), mapped).is_ok());
        let e = authorize(&open, &Method::DELETE, "/workers/x", &headers(None), remote);
        assert_eq!(e.unwrap_err().status(), 403);
        let keyed = sec(Some("c"), Some("a"));
        let e = authorize(&keyed, &Method::POST, "/generate", &headers(None), local);
        assert_eq!(e.unwrap_err().status(), 401);
        let e = authorize(&keyed, &Method::POST, "/generate", &headers(Some("Bearer a")), local);
        assert_eq!(e.unwrap_err().status(), 401, "the admin key is not a client key");
        assert!(authorize(&keyed, &Method::POST, "/generate", &headers(Some("Bearer c")), local)
            .is_ok());
        assert!(authorize(&keyed, &Method::GET, "/health", &headers(None), remote).is_ok());
        let e = authorize(&keyed, &Method::GET, "/workers", &headers(Some("Bearer c")), local);
        assert_eq!(e.unwrap_err().status(), 401, "reads need the admin key when one is set");
        let client_only = sec(Some("c"), None);
        let e = authorize(&client_only, &Method::POST, "/workers", &headers(None), local);
        assert_eq!(e.unwrap_err().status(), 401, "the API key guards admin routes then");
        assert!(authorize(
            &client_only,
            &Method::POST,
            "/workers",
            &headers(Some("Bearer c")),
            remote
        )
        .is_ok());
        assert!(authorize(&keyed, &Method::POST, "/workers", &headers(Some("Bearer a")), remote)
            .is_ok());
    }

    #[test]
    fn worker_addresses() {
        let none: Vec<IpNet> = Vec::new();
        for bad in [
            "169.254.169.254",
            "169.254.170.2",
            "fe80::1",
            "::ffff:169.254.169.254",
            "fd00:ec2::254",
            "100.100.100.200",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::",
        ] {
            assert!(refuse_ip(bad.parse().unwrap(), &none).is_some(), "{bad}");
        }
        for ok in ["127.0.0.1", "10.0.0.5", "192.168.1.2", "::1", "2001:db8::1", "100.64.0.1"] {
            assert_eq!(refuse_ip(ok.parse().unwrap(), &none), None, "{ok}");
        }
        let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        assert_eq!(refuse_ip("10.9.8.7".parse().unwrap(), &nets), None);
        assert!(refuse_ip("192.168.0.1".parse().unwrap(), &nets).unwrap().contains("outside"));
        assert!(check_worker_addr("http://10.1.1.1:8000", &nets).is_ok());
        assert!(check_worker_addr("http://[fe80::2]:8000", &none).is_err());
        assert!(check_worker_addr("http://11.1.1.1:8000", &nets).is_err());
    }

    #[tokio::test]
    async fn names_are_resolved_and_metadata_names_refused() {
        let none: Vec<IpNet> = Vec::new();
        let e = check_worker_url("http://metadata.google.internal", &none).await.unwrap_err();
        assert!(e.contains("metadata"), "{e}");
        assert!(check_worker_url("http://localhost:8000", &none).await.is_ok());
        let only_ten: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let e = check_worker_url("http://localhost:8000", &only_ten).await.unwrap_err();
        assert!(e.contains("outside the allowed worker networks"), "{e}");
        assert!(!host_is_loopback("0.0.0.0") && host_is_loopback("127.0.0.1"));
        assert!(host_is_loopback("localhost") && host_is_loopback("::1"));
    }
}
