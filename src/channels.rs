//! Channel names and the glob patterns that grant access to them.
//!
//! A channel name is 1 to 256 bytes of visible ASCII (`!` to `~`). A pattern matches a whole
//! name; `*` matches any run of characters (`:` and the empty run included) and every other
//! character matches itself. Client input is only ever matched *against* patterns: a requested
//! `*` is the literal channel `*`.
//!
//! Channels whose name starts with `__` belong to Redis itself (keyspace and keyevent
//! notifications, `__redis__:invalidate`, and whatever Redis reserves next): they can carry key
//! names and values of other applications. Such a channel is matched only by a pattern that
//! starts with `__` itself, so the operator wrote the reserved prefix out; `*`, `user:*` or
//! `*keyevent*` never reach one.

/// Longest accepted channel name, in bytes.
pub const MAX_CHANNEL_NAME_BYTES: usize = 256;

/// Placeholder in `auth.user_channel`, the name of each user's personal channel, replaced by the
/// token's `sub`. Kept with the channel names rather than in `auth`, so that the configuration
/// (which checks the template) and authorization (which fills it in) need not import each other.
pub const SUB_PLACEHOLDER: &str = "{sub}";

/// The prefix of the channels Redis publishes on itself (`__keyspace@0__:...`, `__redis__:...`).
pub const REDIS_INTERNAL_PREFIX: &str = "__";

/// Whether `name` is one of Redis's own channels, served only when granted by name.
pub fn is_redis_internal(name: &str) -> bool {
    name.starts_with(REDIS_INTERNAL_PREFIX)
}

/// Checks a requested channel name; the error says what is wrong.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("channel name is empty".to_string());
    }
    if name.len() > MAX_CHANNEL_NAME_BYTES {
        return Err(format!(
            "channel name is longer than {MAX_CHANNEL_NAME_BYTES} bytes"
        ));
    }
    if !name.bytes().all(is_visible_ascii) {
        return Err("channel name must be visible ASCII (`!` to `~`)".to_string());
    }
    Ok(())
}

fn is_visible_ascii(byte: u8) -> bool {
    (b'!'..=b'~').contains(&byte)
}

/// A compiled channel glob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    /// The literal pieces between `*`s; `parts.len() - 1` stars separate them.
    parts: Vec<String>,
}

impl Pattern {
    /// Parses a pattern: visible ASCII, 1 to 256 bytes, `*` as the wildcard.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        validate_name(text)
            .map_err(|e| format!("pattern `{text}`: {}", e.replace("channel name", "pattern")))?;
        Ok(Pattern {
            parts: text.split('*').map(str::to_string).collect(),
        })
    }

    /// Whether the whole of `name` matches. A Redis-internal name matches only a pattern that
    /// starts with the reserved prefix literally (see the module docs).
    pub fn matches(&self, name: &str) -> bool {
        let (first, rest) = match self.parts.split_first() {
            Some(split) => split,
            None => return false,
        };
        if is_redis_internal(name) && !first.starts_with(REDIS_INTERNAL_PREFIX) {
            return false;
        }
        let Some(mut remaining) = name.strip_prefix(first.as_str()) else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            return remaining.is_empty(); // no star: exact match
        };
        // Greedy leftmost matching of the middle pieces is optimal for `*`-only globs: taking
        // the earliest occurrence leaves the most room for everything after it.
        for piece in middle {
            match remaining.find(piece.as_str()) {
                Some(at) => remaining = &remaining[at + piece.len()..],
                None => return false,
            }
        }
        remaining.len() >= last.len() && remaining.ends_with(last.as_str())
    }
}

/// The set of patterns from `channels.public`.
#[derive(Clone, Debug, Default)]
pub struct PublicChannels {
    patterns: Vec<Pattern>,
}

impl PublicChannels {
    /// Compiles the configured patterns.
    pub fn new(patterns: &[String]) -> Result<PublicChannels, String> {
        let patterns = patterns
            .iter()
            .map(|p| Pattern::parse(p))
            .collect::<Result<_, _>>()?;
        Ok(PublicChannels { patterns })
    }

    /// Whether any pattern allows `name`.
    pub fn allows(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, name: &str) -> bool {
        Pattern::parse(pattern)
            .expect("valid pattern")
            .matches(name)
    }

    #[test]
    fn literal_pattern_matches_only_itself() {
        assert!(matches("orders", "orders"));
        assert!(!matches("orders", "orders2"));
        assert!(!matches("orders", "order"));
    }

    #[test]
    fn star_matches_any_run_including_colons_and_nothing() {
        assert!(matches("user:*", "user:42"));
        assert!(matches("user:*", "user:"));
        assert!(matches("user:*", "user:42:inbox"));
        assert!(!matches("user:*", "user"));
        assert!(matches("*", "anything:at:all"));
        assert!(matches("tenant:*:billing", "tenant:7:billing"));
        assert!(matches("tenant:*:billing", "tenant::billing"));
        assert!(!matches("tenant:*:billing", "tenant:7:billing:x"));
        assert!(matches("a*b*c", "abc"));
        assert!(matches("a*b*c", "axxbyyc"));
        assert!(!matches("a*b*c", "acb"));
        assert!(matches("*ab", "abab"));
        assert!(!matches("a*a", "a"));
        assert!(matches("**", ""));
    }

    #[test]
    fn client_star_is_a_literal_name() {
        assert!(!matches("orders", "*"));
        assert!(matches("*", "*"));
    }

    #[test]
    fn redis_internal_channels_match_only_patterns_that_name_their_prefix() {
        let keyevent = "__keyevent@0__:set";
        assert!(!matches("*", keyevent));
        assert!(!matches("*keyevent*", keyevent));
        assert!(!matches("*__:set", keyevent));
        assert!(!matches("_*", keyevent));
        assert!(!matches("*", "__redis__:invalidate"));
        assert!(matches("__keyevent@0__:*", keyevent));
        assert!(matches("__keyevent@0__:set", keyevent));
        assert!(matches("__*", "__keyspace@0__:session"));
        // One leading underscore is an ordinary name.
        assert!(matches("*", "_private"));
    }

    #[test]
    fn names_must_be_visible_ascii_and_bounded() {
        assert!(validate_name("user:42").is_ok());
        assert!(validate_name("!~").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name("é").is_err());
        assert!(validate_name(&"x".repeat(256)).is_ok());
        assert!(validate_name(&"x".repeat(257)).is_err());
    }
}
