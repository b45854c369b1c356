//! The gateway's Redis Function library (`ssehub`, source in `redis/ssehub.lua`): the one place
//! where the shared history's event ids are assigned. This module owns its source, with the
//! configured bounds filled in, and loading it into Redis without replacing a newer version that
//! another instance of the fleet loaded.
//!
//! Functions (see the Lua source for the exact replies):
//! - `FCALL ssehub_publish 1 <channel> <payload> [<idempotency-key>]`: stores the event, assigns
//!   its id, broadcasts it (`PUBLISH`, or `SPUBLISH` in a Redis Cluster: [`Broadcast`]), and
//!   answers `"<epoch> <id>"`;
//! - `FCALL ssehub_position 1 <channel>`: the channel's current position, creating its epoch;
//! - `FCALL_RO ssehub_read 1 <channel> <epoch> <id> <count>`: the events after a position, or
//!   why they cannot be given (`history_expired`, `unknown_position`);
//! - `FCALL ssehub_tail 1 <channel> <count>`: the channel's position and most recent events,
//!   what a gateway loads when it starts serving the channel;
//! - `FCALL_RO ssehub_version 0`: the library's version.
//!
//! It also owns the key layout's one rule that the gateway needs outside Lua: where a channel's
//! keys and live broadcast channel are ([`key_base`], [`live_channel`], [`channel_of_live`]).

use redis::aio::ConnectionLike;

/// Version of the library in this build. A fleet upgraded one instance at a time runs two
/// versions at once: a version only adds to what the one before it offered, and an instance
/// never replaces a newer library with its own.
pub const LIBRARY_VERSION: i64 = 2;

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
    /// How the live broadcast is published (`redis.mode`).
    pub broadcast: Broadcast,
}

/// The command the library broadcasts live events with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broadcast {
    /// `PUBLISH`: a standalone server or a Sentinel-managed primary.
    Publish,
    /// `SPUBLISH`: a Redis Cluster, where the broadcast stays in the shard that owns the
    /// channel's slot (a plain `PUBLISH` would be relayed to every node over the cluster bus)
    /// and the gateway subscribes with `SSUBSCRIBE` there. Redis takes it in a function
    /// because the live channel hashes to the slot of the key the call declares.
    Spublish,
}

impl Broadcast {
    /// The broadcast of a Redis deployed as `mode`.
    pub fn for_mode(mode: crate::config::RedisMode) -> Broadcast {
        match mode {
            crate::config::RedisMode::Cluster => Broadcast::Spublish,
            crate::config::RedisMode::Standalone | crate::config::RedisMode::Sentinel => {
                Broadcast::Publish
            }
        }
    }

    /// The Redis command.
    pub fn command(self) -> &'static str {
        match self {
            Broadcast::Publish => "PUBLISH",
            Broadcast::Spublish => "SPUBLISH",
        }
    }
}

/// Prefix of the keys of a channel whose name has a hash tag (`{...}`), which Redis Cluster
/// hashes alone; mirrors `base_of` in the Lua source.
const TAGGED_PREFIX: &str = "ssehub:t:";
/// Prefix of the keys of a channel without a hash tag: the whole name becomes the tag.
const UNTAGGED_PREFIX: &str = "ssehub:{";
/// Suffix of the channel live events are broadcast on.
const LIVE_SUFFIX: &str = ":live";

/// Whether `name` has a Redis Cluster hash tag: a `{` followed later by a `}` with at least one
/// byte between them.
fn has_hash_tag(name: &str) -> bool {
    name.find('{')
        .and_then(|open| name[open + 1..].find('}'))
        .is_some_and(|distance| distance > 0)
}

/// The common prefix of channel `name`'s keys, or `None` for a name the library refuses (a `}`
/// without a hash tag, which would put the keys of different channels in one slot).
pub fn key_base(name: &str) -> Option<String> {
    if has_hash_tag(name) {
        Some(format!("{TAGGED_PREFIX}{name}"))
    } else if name.contains('}') {
        None
    } else {
        Some(format!("{UNTAGGED_PREFIX}{name}}}"))
    }
}

/// The pub/sub channel the library broadcasts channel `name`'s events on.
pub fn live_channel(name: &str) -> Option<String> {
    key_base(name).map(|base| base + LIVE_SUFFIX)
}

/// The channel whose events are broadcast on `live`, the inverse of [`live_channel`].
pub fn channel_of_live(live: &str) -> Option<&str> {
    let base = live.strip_suffix(LIVE_SUFFIX)?;
    if let Some(name) = base.strip_prefix(TAGGED_PREFIX) {
        return has_hash_tag(name).then_some(name);
    }
    let name = base.strip_prefix(UNTAGGED_PREFIX)?.strip_suffix('}')?;
    (!has_hash_tag(name) && !name.contains('}')).then_some(name)
}

/// How long the keys of a channel nobody publishes to are kept, at least.
const MIN_KEY_TTL_MS: u64 = 24 * 60 * 60 * 1000;

impl LibraryBounds {
    /// The bounds the configuration sets.
    pub fn from_settings(settings: &crate::config::Settings) -> LibraryBounds {
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
            broadcast: Broadcast::for_mode(settings.redis.mode),
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
        .replace("@BROADCAST@", bounds.broadcast.command())
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
    fn live_channels_map_back_to_their_channel_and_never_collide() {
        for name in ["orders", "{x}", "x", "user:{42}:feed", "a{b", "a{"] {
            let live = live_channel(name);
            assert_eq!(
                live.as_deref().and_then(channel_of_live),
                Some(name),
                "{name}"
            );
        }
        assert_ne!(live_channel("{x}"), live_channel("x"));
        assert_eq!(key_base("a}b"), None);
        // Redis reads no tag in "{}..." (nothing between the braces): refused like "a}b".
        assert_eq!(key_base("{}{x}"), None);
        assert_eq!(channel_of_live("orders"), None);
        assert_eq!(channel_of_live("ssehub:t:orders:live"), None);
    }

    const BOUNDS: LibraryBounds = LibraryBounds {
        capacity: 1000,
        max_age_ms: 300_000,
        key_ttl_ms: 86_400_000,
        idempotency_ms: 300_000,
        max_payload_bytes: 65_536,
        broadcast: Broadcast::Publish,
    };

    #[test]
    fn every_placeholder_is_filled() {
        let source = library_source(&BOUNDS);
        assert!(!source.contains('@'), "{source}");
        assert!(source.contains("local CAPACITY = 1000"));
        assert!(source.contains(&format!("local VERSION = {LIBRARY_VERSION}\n")));
    }

    /// The `redis.call` lines that broadcast, whatever the command.
    fn broadcasts(source: &str) -> Vec<&str> {
        source
            .lines()
            .filter(|line| line.contains("PUBLISH'"))
            .map(str::trim)
            .collect()
    }

    #[test]
    fn the_live_broadcast_is_sharded_in_a_cluster_only() {
        let cluster = LibraryBounds {
            broadcast: Broadcast::Spublish,
            ..BOUNDS
        };
        assert_eq!(
            broadcasts(&library_source(&cluster)),
            ["local LIVE_BROADCAST = 'SPUBLISH'"]
        );
        assert_eq!(
            broadcasts(&library_source(&BOUNDS)),
            ["local LIVE_BROADCAST = 'PUBLISH'"]
        );
        let mut settings = crate::config::Settings::default();
        for (mode, broadcast) in [
            (crate::config::RedisMode::Standalone, Broadcast::Publish),
            (crate::config::RedisMode::Sentinel, Broadcast::Publish),
            (crate::config::RedisMode::Cluster, Broadcast::Spublish),
        ] {
            settings.redis.mode = mode;
            assert_eq!(
                LibraryBounds::from_settings(&settings).broadcast,
                broadcast,
                "{mode:?}"
            );
        }
    }
}
