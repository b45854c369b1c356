//! Admission control for new streams: a global cap, a per-client-address cap, and a rate cap
//! for reconnect storms. Each admitted stream holds an [`Admitted`] guard that gives its slots
//! back when the stream ends.
//!
//! The client address is the TCP peer, or — only when the peer is one of `trusted_proxies` — the
//! address it forwarded ([`ClientAddresses`]), so clients cannot spoof their way around the
//! per-address cap.
//!
//! The per-address counting itself ([`AddressCounts`]) is shared with the connection caps that
//! the listener applies at accept (`connection`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::forwarded::ClientAddresses;
use super::ApiError;
use crate::config::LimitsSettings;

/// Open connections (or streams) per client address, with slots that give themselves back.
#[derive(Clone, Debug, Default)]
pub(crate) struct AddressCounts(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One counted slot of an address; released on drop.
#[derive(Debug)]
pub(crate) struct AddressSlot {
    counts: AddressCounts,
    address: IpAddr,
}

impl AddressCounts {
    /// Takes a slot for `address` unless it already holds `limit`.
    pub(crate) fn try_take(&self, address: IpAddr, limit: usize) -> Option<AddressSlot> {
        let mut counts = self.0.lock();
        let count = counts.entry(address).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            counts: self.clone(),
            address,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock();
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// Decides whether a new stream may open.
#[derive(Debug)]
pub(crate) struct Admission {
    /// `None` when `max_connections` is 0 (no cap).
    total: Option<Arc<Semaphore>>,
    per_ip_limit: usize,
    per_ip: AddressCounts,
    clients: ClientAddresses,
    /// `None` when `max_new_connections_per_sec` is 0 (no cap).
    rate: Option<Mutex<TokenBucket>>,
}

/// Proof of admission; releases the stream's slots on drop.
#[derive(Debug)]
pub(crate) struct Admitted {
    _total: Option<OwnedSemaphorePermit>,
    _per_ip: Option<AddressSlot>,
}

impl Admission {
    pub(crate) fn new(limits: &LimitsSettings) -> Admission {
        let rate = limits.max_new_connections_per_sec;
        Admission {
            total: (limits.max_connections > 0)
                .then(|| Arc::new(Semaphore::new(limits.max_connections))),
            per_ip_limit: limits.max_connections_per_ip,
            per_ip: AddressCounts::default(),
            clients: ClientAddresses::new(&limits.trusted_proxies, limits.forwarded_header),
            rate: (rate > 0).then(|| Mutex::new(TokenBucket::new(f64::from(rate)))),
        }
    }

    /// Admits a stream from `peer` or says why not.
    pub(crate) fn admit(&self, peer: IpAddr, headers: &HeaderMap) -> Result<Admitted, ApiError> {
        let total = match &self.total {
            None => None,
            Some(semaphore) => Some(semaphore.clone().try_acquire_owned().map_err(|_| {
                ApiError::Overloaded("the gateway is at its connection limit".to_string())
            })?),
        };
        let per_ip = if self.per_ip_limit > 0 {
            let client = self.client_address(peer, headers);
            let slot = self
                .per_ip
                .try_take(client, self.per_ip_limit)
                .ok_or_else(|| {
                    ApiError::TooManyRequests("too many open streams from this address".to_string())
                })?;
            Some(slot)
        } else {
            None
        };
        // Build the guard first: if the rate check refuses, dropping it releases the slots.
        let admitted = Admitted {
            _total: total,
            _per_ip: per_ip,
        };
        if let Some(bucket) = &self.rate {
            if !bucket.lock().take(Instant::now()) {
                return Err(ApiError::Overloaded(
                    "too many new connections per second; retry shortly".to_string(),
                ));
            }
        }
        Ok(admitted)
    }

    /// The client's address: the peer, or the address a trusted proxy forwarded.
    pub(crate) fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        self.clients.resolve(peer, headers)
    }
}

/// A token bucket refilled at `rate` per second, holding at most one second's worth.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    fn new(rate: f64) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: rate,
            updated: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated);
        self.updated = now;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How long a client refused for rate should wait.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn limits() -> LimitsSettings {
        LimitsSettings {
            trusted_proxies: vec!["10.0.0.1".parse().expect("ip")],
            ..LimitsSettings::default()
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let admission = Admission::new(&limits());
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 2.2.2.2, 10.0.0.1"),
        );
        let proxy: IpAddr = "10.0.0.1".parse().expect("ip");
        let stranger: IpAddr = "3.3.3.3".parse().expect("ip");
        assert_eq!(
            admission.client_address(proxy, &headers),
            "2.2.2.2".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(admission.client_address(stranger, &headers), stranger);
        assert_eq!(admission.client_address(proxy, &HeaderMap::new()), proxy);
    }

    #[test]
    fn per_address_slots_are_released_on_drop() {
        let admission = Admission::new(&LimitsSettings {
            max_connections_per_ip: 2,
            ..LimitsSettings::default()
        });
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        let headers = HeaderMap::new();
        let a = admission.admit(ip, &headers).expect("first");
        let _b = admission.admit(ip, &headers).expect("second");
        assert!(admission.admit(ip, &headers).is_err());
        drop(a);
        assert!(admission.admit(ip, &headers).is_ok());
    }

    #[test]
    fn token_bucket_refills_at_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2.0);
        bucket.updated = start;
        assert!(bucket.take(start));
        assert!(bucket.take(start));
        assert!(!bucket.take(start));
        assert!(bucket.take(start + Duration::from_millis(500)));
        assert!(!bucket.take(start + Duration::from_millis(500)));
    }
}
