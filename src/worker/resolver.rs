//! Name resolution for the HTTP threads.
//!
//! ureq resolves the host of every request, even one that then reuses a
//! pooled keep-alive connection, and with a timeout set its default resolver
//! spawns a thread per lookup. That thread per request was the largest cost
//! of delivering over keep-alive. Here an IP literal is used as it is, and a
//! name is looked up once per [`TTL`] (through the default resolver, so the
//! lookup itself still honours the timeout).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// How long a looked-up name is reused. Short, so a DNS change (failover of
/// a receiver) reaches new connections quickly.
const TTL: Duration = Duration::from_secs(10);

/// Entries kept at most; past this the cache starts over, so a kind whose
/// URL puts the record id in the host name can't grow it without bound.
const MAX_ENTRIES: usize = 1024;

#[derive(Debug, Default)]
pub struct CachingResolver {
    default: DefaultResolver,
    cache: Mutex<HashMap<(String, u16), (Instant, ResolvedSocketAddrs)>>,
}

impl Resolver for CachingResolver {
    fn resolve(&self, uri: &Uri, config: &Config, timeout: NextTimeout) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let (Some(host), Some(port)) = (uri.host(), port_of(uri)) else {
            return self.default.resolve(uri, config, timeout);
        };
        if let Some(ip) = ip_literal(host) {
            let mut addrs = self.empty();
            addrs.push(SocketAddr::new(ip, port));
            return Ok(addrs);
        }
        let key = (host.to_ascii_lowercase(), port);
        if let Some((at, addrs)) = self.cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            if at.elapsed() < TTL {
                return Ok(addrs);
            }
        }
        // Looked up without holding the lock: a slow DNS server must not
        // stall requests to other hosts.
        let addrs = self.default.resolve(uri, config, timeout)?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= MAX_ENTRIES {
                cache.clear();
            }
            cache.insert(key, (Instant::now(), addrs.clone()));
        }
        Ok(addrs)
    }
}

fn port_of(uri: &Uri) -> Option<u16> {
    uri.port_u16().or(match uri.scheme_str() {
        Some("http") => Some(80),
        Some("https") => Some(443),
        _ => None,
    })
}

/// `127.0.0.1`, or `[::1]` as it appears in a URL.
fn ip_literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(url: &str) -> Vec<SocketAddr> {
        let uri: Uri = url.parse().unwrap();
        let config = Config::default();
        CachingResolver::default().resolve(&uri, &config, NextTimeout::default()).unwrap().to_vec()
    }

    #[test]
    fn ip_literals_are_used_as_they_are() {
        assert_eq!(resolve("http://127.0.0.1:8080/x"), vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(resolve("http://[::1]/x"), vec!["[::1]:80".parse().unwrap()]);
        assert_eq!(resolve("https://10.1.2.3/x"), vec!["10.1.2.3:443".parse().unwrap()]);
    }

    #[test]
    fn names_are_looked_up() {
        let addrs = resolve("http://localhost:9/x");
        assert!(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 9), "{addrs:?}");
    }
}
