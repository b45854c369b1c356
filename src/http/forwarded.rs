//! Who the client is when the gateway sits behind proxies: the TCP peer, or the address a
//! trusted proxy forwarded.
//!
//! Only a peer listed in `limits.trusted_proxies` is believed, and only in the one header that
//! `limits.forwarded_header` names (`X-Forwarded-For` by default, or `Forwarded`, RFC 7239); the
//! other header is ignored, so a client cannot add a second opinion the proxy does not strip.
//! The hops are read from the right (the nearest proxy's entry last): trusted proxies are
//! skipped, and the first other address is the client. A hop may be written `ip`, `ip:port`,
//! `[ipv6]` or `[ipv6]:port`; a hop that still does not parse (`unknown`, an obfuscated name, a
//! `Forwarded` element without `for=`) ends the walk and the last trusted address is the client,
//! never an address the client wrote further left. IPv4-mapped IPv6 addresses are compared as
//! the IPv4 address they carry.

use std::net::{IpAddr, SocketAddr};

use crate::config::ForwardedHeader;
use http::HeaderMap;

/// Resolves client addresses from peers and forwarding headers.
#[derive(Clone, Debug, Default)]
pub(crate) struct ClientAddresses {
    trusted_proxies: Vec<IpAddr>,
    header: ForwardedHeader,
}

impl ClientAddresses {
    pub(crate) fn new(trusted_proxies: &[IpAddr], header: ForwardedHeader) -> ClientAddresses {
        ClientAddresses {
            trusted_proxies: trusted_proxies.iter().map(IpAddr::to_canonical).collect(),
            header,
        }
    }

    /// The client's address for a request from `peer` (see the module docs).
    pub(crate) fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.to_canonical();
        if !self.is_trusted(client) {
            return client;
        }
        for hop in self.hops(headers).into_iter().rev() {
            match hop {
                Some(address) if self.is_trusted(address) => client = address,
                Some(address) => return address,
                // Everything left of an unreadable hop was written by someone we cannot vouch for.
                None => return client,
            }
        }
        client
    }

    fn is_trusted(&self, address: IpAddr) -> bool {
        self.trusted_proxies.contains(&address)
    }

    /// The hops of the configured header, leftmost first; `None` for one that does not parse.
    fn hops(&self, headers: &HeaderMap) -> Vec<Option<IpAddr>> {
        let name = match self.header {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        };
        let mut hops = Vec::new();
        for value in headers.get_all(name) {
            let Ok(text) = value.to_str() else {
                hops.push(None);
                continue;
            };
            for element in text.split(',') {
                hops.push(match self.header {
                    ForwardedHeader::XForwardedFor => parse_node(element),
                    ForwardedHeader::Forwarded => forwarded_for(element).and_then(parse_node),
                });
            }
        }
        hops
    }
}

/// The `for=` value of one `Forwarded` element (`for=1.2.3.4;proto=https`).
fn forwarded_for(element: &str) -> Option<&str> {
    element.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim().eq_ignore_ascii_case("for").then_some(value)
    })
}

/// One hop: `ip`, `ip:port`, `[ipv6]` or `[ipv6]:port`, optionally quoted.
fn parse_node(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    let address = if let Ok(ip) = text.parse::<IpAddr>() {
        ip
    } else if let Ok(socket) = text.parse::<SocketAddr>() {
        socket.ip()
    } else {
        let bracketed = text.strip_prefix('[')?.strip_suffix(']')?;
        bracketed.parse::<IpAddr>().ok()?
    };
    Some(address.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    fn resolve(header: ForwardedHeader, values: &[&'static str]) -> IpAddr {
        let addresses = ClientAddresses::new(&[ip("10.0.0.1"), ip("10.0.0.2")], header);
        let name = match header {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        };
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(name, HeaderValue::from_static(value));
        }
        addresses.resolve(ip("::ffff:10.0.0.1"), &headers)
    }

    #[test]
    fn the_nearest_untrusted_hop_is_the_client() {
        let xff = ForwardedHeader::XForwardedFor;
        assert_eq!(resolve(xff, &["1.1.1.1, 2.2.2.2, 10.0.0.2"]), ip("2.2.2.2"));
        assert_eq!(resolve(xff, &["1.1.1.1", "2.2.2.2"]), ip("2.2.2.2"));
        assert_eq!(resolve(xff, &[]), ip("10.0.0.1"));
        assert_eq!(resolve(xff, &["10.0.0.2"]), ip("10.0.0.2"));
    }

    #[test]
    fn hops_with_ports_brackets_and_mapped_addresses_parse() {
        let xff = ForwardedHeader::XForwardedFor;
        assert_eq!(resolve(xff, &["2.2.2.2:4711"]), ip("2.2.2.2"));
        assert_eq!(resolve(xff, &["[2001:db8::1]"]), ip("2001:db8::1"));
        assert_eq!(resolve(xff, &["[2001:db8::1]:4711"]), ip("2001:db8::1"));
        assert_eq!(resolve(xff, &["::ffff:2.2.2.2"]), ip("2.2.2.2"));
        // A mapped trusted proxy is still trusted.
        assert_eq!(resolve(xff, &["3.3.3.3, ::ffff:10.0.0.2"]), ip("3.3.3.3"));
    }

    #[test]
    fn an_unreadable_hop_stops_at_the_last_trusted_address() {
        let xff = ForwardedHeader::XForwardedFor;
        assert_eq!(resolve(xff, &["6.6.6.1, unknown"]), ip("10.0.0.1"));
        assert_eq!(
            resolve(xff, &["6.6.6.1, unknown, 10.0.0.2"]),
            ip("10.0.0.2")
        );
        assert_eq!(resolve(xff, &["6.6.6.1, _hidden"]), ip("10.0.0.1"));
        assert_eq!(resolve(xff, &["6.6.6.1, "]), ip("10.0.0.1"));
    }

    #[test]
    fn forwarded_reads_for_parameters_and_ignores_x_forwarded_for() {
        let fwd = ForwardedHeader::Forwarded;
        assert_eq!(
            resolve(
                fwd,
                &["for=1.1.1.1;proto=https, For=\"[2001:db8::17]:4711\""]
            ),
            ip("2001:db8::17")
        );
        assert_eq!(resolve(fwd, &["for=6.6.6.6, for=unknown"]), ip("10.0.0.1"));
        assert_eq!(resolve(fwd, &["for=6.6.6.6, proto=https"]), ip("10.0.0.1"));
        let addresses = ClientAddresses::new(&[ip("10.0.0.1")], fwd);
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        assert_eq!(addresses.resolve(ip("10.0.0.1"), &headers), ip("10.0.0.1"));
    }
}
