//! The gateway's Redis Function library (`ssehub`, source in `redis/ssehub.lua`): the one place
//! where the shared history's event ids are assigned. This module owns its source, with the
//! configured bounds filled in, and loading it into Redis without replacing a newer version that
//! another instance of the fleet loaded.
//!
//! Functions (see the Lua source for the exact replies):
//! - `FCALL ssehub_publish 1 <channel> <payload> [<idempotency-key>]`: stores the event, assigns
//!   its id, broadcasts it, and answers `"<epoch> <id>"`;
//! - `FCALL ssehub_position 1 <channel>`: the channel's current position, creating its epoch;
//! - `FCALL_RO ssehub_read 1 <channel> <epoch> <id> <count>`: the events after a position, or
//!   why they cannot be given (`history_expired`, `unknown_position`);
//! - `FCALL_RO ssehub_version 0`: the library's version.

use redis::aio::ConnectionLike;

/// Version of the library in this build. A fleet upgraded one instance at a time runs two
/// versions at once: a version only adds to what the one before it offered, and an instance
/// never replaces a newer library with its own.
pub const LIBRARY_VERSION: i64 = 1;

const SOURCE: &str = include_str!("redis/ssehub.lua");

/// The bounds the library applies to every channel, from the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LibraryBounds {
    /// Most events kept per channel (`history.capacity`).
    pub capacity: usize,
    /// Oldest event kept, in milliseconds; `0` = no age limit (`history.max_age_secs`).
    pub max_age_ms: u64,
    /// How long the keys of a channel nobody publishes to are kept, in milliseconds.
    pub key_ttl_ms: u64,
    /// How long an idempotency key answers with its first position, in milliseconds.
    pub idempotency_ms: u64,
    /// Largest payload stored (`limits.max_payload_bytes`): larger ones are refused.
    pub max_payload_bytes: usize,
}

/// Shortest time the keys of a channel nobody publishes to are kept: a day, or the history's
/// age bound when that is longer.
const MIN_KEY_TTL_MS: u64 = 24 * 3600 * 1000;

impl LibraryBounds {
    /// The bounds every instance configured with `settings` loads the library with.
    pub fn from_settings(settings: &crate::Settings) -> LibraryBounds {
        let max_age_ms = settings.history.max_age_secs.saturating_mul(1000);
        LibraryBounds {
            capacity: settings.history.capacity,
            max_age_ms,
            key_ttl_ms: max_age_ms.max(MIN_KEY_TTL_MS),
            idempotency_ms: settings
                .publish
                .idempotency_window_secs
                .saturating_mul(1000),
            max_payload_bytes: settings.limits.max_payload_bytes,
        }
    }
}

/// The library source with `bounds` filled in.
pub fn library_source(bounds: &LibraryBounds) -> String {
    SOURCE
        .replace("@CAPACITY@", &bounds.capacity.to_string())
        .replace("@MAX_AGE_MS@", &bounds.max_age_ms.to_string())
        .replace("@KEY_TTL_MS@", &bounds.key_ttl_ms.to_string())
        .replace("@IDEMPOTENCY_MS@", &bounds.idempotency_ms.to_string())
        .replace("@MAX_PAYLOAD_BYTES@", &bounds.max_payload_bytes.to_string())
}

/// What [`load_library`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loaded {
    /// This build's library is loaded (it was absent, older, or the same version).
    Ours,
    /// A newer version, loaded by a newer instance, was kept.
    Newer(i64),
}

/// Loads the library with `FUNCTION LOAD REPLACE`, unless Redis already holds a newer version.
pub async fn load_library(
    connection: &mut impl ConnectionLike,
    bounds: &LibraryBounds,
) -> redis::RedisResult<Loaded> {
    let loaded: redis::RedisResult<i64> = redis::cmd("FCALL_RO")
        .arg("ssehub_version")
        .arg(0)
        .query_async(connection)
        .await;
    if let Ok(version) = loaded {
        if version > LIBRARY_VERSION {
            return Ok(Loaded::Newer(version));
        }
    }
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(library_source(bounds))
        .query_async::<String>(connection)
        .await?;
    Ok(Loaded::Ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_is_filled() {
        let source = library_source(&LibraryBounds {
            capacity: 1000,
            max_age_ms: 300_000,
            key_ttl_ms: 86_400_000,
            idempotency_ms: 300_000,
            max_payload_bytes: 65_536,
        });
        assert!(!source.contains('@'), "{source}");
        assert!(source.contains("local CAPACITY = 1000"));
        assert!(source.contains(&format!("local VERSION = {LIBRARY_VERSION}\n")));
    }
}
