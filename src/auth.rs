//! Authorization: which channels a request may read.
//!
//! A request may read a channel when a `channels.public` pattern allows it, or when it presents
//! a valid JWT that grants it (a `channels` claim of glob patterns, or the personal channel named
//! by `auth.user_channel` for its `sub`). The token is taken from the first source present:
//! `Authorization: Bearer`, then the `auth.cookie_name` cookie, then the `token` query parameter.
//! Within a source the first value wins too (the first `Authorization` header, the first cookie
//! of that name, the first `token` parameter), as browsers send the most specific cookie first.
//! There is no falling back: a presented token that is invalid is refused even for public
//! channels, so a client with a broken token learns it at once. Only the `Bearer` scheme is a
//! source (a `Basic` header meant for a proxy is ignored), and empty values count as absent.
//! With no key configured, authorization is off: tokens are ignored and only
//! `channels.public` applies.
//!
//! A token is refused (`401`) when its header lists `crit` extensions (the gateway understands
//! none, RFC 7515 §4.1.11), when `iss` is not the one string `auth.issuer` names, or when `exp`
//! is past the year 9999.
//!
//! Publishing (`POST /publish`) takes the token from the same sources and checks it the same
//! way, against its `publish` claim (glob patterns, matched like `channels`). It always needs a
//! token: `channels.public` and the personal channel grant reading only, and with no key
//! configured nobody may publish over HTTP.
//!
//! The accepted algorithm follows from the configured key (HS256 for a secret, RS256 or ES256
//! for a PEM public key), never from the token header: a header only selects among the keys the
//! operator configured, each of which accepts exactly one algorithm.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{AUTHORIZATION, COOKIE};
use http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::channels::{is_redis_internal, Pattern, PublicChannels, SUB_PLACEHOLDER};
use crate::config::{AuthSettings, ConfigError};

/// The latest `exp` accepted: 9999-12-31T23:59:59Z. Anything later is a forged or broken
/// token, and arithmetic on it could overflow the clock.
const LATEST_EXP: u64 = 253_402_300_799;

/// Why a request may not read what it asked for.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No token, or an invalid one: `401`.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid token without the grant: `403`.
    #[error("{0}")]
    Forbidden(String),
}

/// What an accepted request is entitled to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// When the token used expires (plus leeway): the stream must end then. `None` without a
    /// token.
    pub expires_at: Option<SystemTime>,
}

/// Claims the gateway reads from a token.
#[derive(Debug, Deserialize)]
struct Claims {
    exp: u64,
    #[serde(default)]
    channels: Vec<String>,
    /// Channel patterns the token may publish to (`POST /publish`).
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    sub: Option<String>,
    /// Kept raw: jsonwebtoken also accepts an array of issuers, the gateway only one string.
    #[serde(default)]
    iss: Option<serde_json::Value>,
}

/// One configured verification key with the single algorithm it accepts.
struct VerificationKey {
    key: DecodingKey,
    validation: Validation,
}

/// Checks requests against `channels.public` and `[auth]`.
pub struct Authorizer {
    public: PublicChannels,
    keys: Vec<VerificationKey>,
    cookie_name: String,
    user_channel: Option<String>,
    issuer: Option<String>,
    leeway: Duration,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys stay out of debug output.
        f.debug_struct("Authorizer")
            .field("public", &self.public)
            .field("keys", &self.keys.len())
            .field("cookie_name", &self.cookie_name)
            .field("user_channel", &self.user_channel)
            .finish()
    }
}

impl Authorizer {
    /// Builds the authorizer, reading key files. Errors name the configuration key.
    pub fn new(public: PublicChannels, settings: &AuthSettings) -> Result<Authorizer, ConfigError> {
        let mut keys = Vec::new();
        if let Some(secret) = settings.secret()? {
            keys.push(VerificationKey {
                key: DecodingKey::from_secret(secret.as_bytes()),
                validation: validation(Algorithm::HS256, settings),
            });
        }
        if let Some(path) = &settings.jwt_public_key_file {
            let pem = std::fs::read(path).map_err(|e| ConfigError::Invalid {
                key: "auth.jwt_public_key_file",
                message: format!("cannot read {}: {e}", path.display()),
            })?;
            let (key, algorithm) = public_key(&pem).ok_or_else(|| ConfigError::Invalid {
                key: "auth.jwt_public_key_file",
                message: format!(
                    "{} is not an RSA or EC (P-256) public key in PEM",
                    path.display()
                ),
            })?;
            keys.push(VerificationKey {
                key,
                validation: validation(algorithm, settings),
            });
        }
        Ok(Authorizer {
            public,
            keys,
            cookie_name: settings.cookie_name.clone(),
            user_channel: settings.user_channel.clone(),
            issuer: settings.issuer.clone(),
            leeway: Duration::from_secs(settings.leeway_secs),
        })
    }

    /// Whether any token verification key is configured.
    pub fn tokens_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Decides whether the request may read `channels`. `query_token` is the `token` query
    /// parameter, if any.
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
        channels: &[String],
    ) -> Result<Access, Denied> {
        let Some(token) = self.presented_token(headers, query_token) else {
            return match channels.iter().find(|c| !self.public.allows(c)) {
                None => Ok(Access { expires_at: None }),
                // Without any verification key no token could help: the answer is plain 403.
                Some(channel) if !self.tokens_enabled() => Err(Denied::Forbidden(format!(
                    "channel `{channel}` is not public"
                ))),
                Some(channel) => Err(Denied::Unauthenticated(format!(
                    "channel `{channel}` is not public: a token is required"
                ))),
            };
        };
        let claims = self.verify(&token)?;
        let grants: Vec<Pattern> = claims
            .channels
            .iter()
            .map(|p| Pattern::parse(p))
            .collect::<Result<_, _>>()
            .map_err(|e| {
                Denied::Unauthenticated(format!("invalid token: `channels` claim: {e}"))
            })?;
        let personal = self.personal_channel(claims.sub.as_deref());
        let allowed = |channel: &String| {
            self.public.allows(channel)
                || personal.as_deref() == Some(channel.as_str())
                || grants.iter().any(|g| g.matches(channel))
        };
        if let Some(channel) = channels.iter().find(|c| !allowed(c)) {
            return Err(Denied::Forbidden(format!(
                "the token does not grant channel `{channel}`"
            )));
        }
        Ok(Access {
            expires_at: Some(self.expiry(claims.exp)?),
        })
    }

    /// Decides whether the request may publish to `channel`: it needs a valid token whose
    /// `publish` claim matches the channel. `query_token` is the `token` query parameter.
    pub fn authorize_publish(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
        channel: &str,
    ) -> Result<(), Denied> {
        if !self.tokens_enabled() {
            // No anonymous publishing: without a key no token can be checked, so nobody may.
            return Err(Denied::Unauthenticated(
                "publishing needs a token, and no token key is configured ([auth])".to_string(),
            ));
        }
        let token = self
            .presented_token(headers, query_token)
            .ok_or_else(|| Denied::Unauthenticated("publishing needs a token".to_string()))?;
        let claims = self.verify(&token)?;
        self.expiry(claims.exp)?;
        let grants: Vec<Pattern> = claims
            .publish
            .iter()
            .map(|p| Pattern::parse(p))
            .collect::<Result<_, _>>()
            .map_err(|e| Denied::Unauthenticated(format!("invalid token: `publish` claim: {e}")))?;
        if !grants.iter().any(|g| g.matches(channel)) {
            return Err(Denied::Forbidden(format!(
                "the token does not grant publishing to channel `{channel}`"
            )));
        }
        Ok(())
    }

    /// When a stream on a token expiring at `exp` must end. An `exp` the clock cannot represent
    /// makes the token invalid rather than panicking the request.
    fn expiry(&self, exp: u64) -> Result<SystemTime, Denied> {
        UNIX_EPOCH
            .checked_add(Duration::from_secs(exp))
            .filter(|_| exp <= LATEST_EXP)
            .and_then(|at| at.checked_add(self.leeway))
            .ok_or_else(|| Denied::Unauthenticated("invalid token: `exp` out of range".into()))
    }

    /// The first token source present; later sources are not consulted. With no verification
    /// key configured, authorization is off and tokens are not looked at.
    fn presented_token(&self, headers: &HeaderMap, query_token: Option<&str>) -> Option<String> {
        if !self.tokens_enabled() {
            return None;
        }
        let bearer = headers.get(AUTHORIZATION).and_then(|value| {
            let text = String::from_utf8_lossy(value.as_bytes());
            // Other schemes (Basic for a proxy, ...) are not ours: only Bearer is a source.
            let (scheme, token) = text.trim().split_once(' ').unwrap_or((&text, ""));
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_string())
        });
        bearer
            .or_else(|| cookie(headers, &self.cookie_name).filter(|t| !t.is_empty()))
            .or_else(|| query_token.filter(|t| !t.is_empty()).map(str::to_string))
    }

    fn verify(&self, token: &str) -> Result<Claims, Denied> {
        let invalid = |why: &str| Denied::Unauthenticated(format!("invalid token: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("malformed"))?;
        if header.crit.is_some() {
            return Err(invalid("`crit` header extensions are not supported"));
        }
        let key = self
            .keys
            .iter()
            .find(|k| k.validation.algorithms.contains(&header.alg))
            .ok_or_else(|| invalid("algorithm not accepted"))?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .map(|data| data.claims)
            .map_err(|e| invalid(&describe(&e)))?;
        if let Some(issuer) = &self.issuer {
            if claims.iss.as_ref().and_then(|iss| iss.as_str()) != Some(issuer.as_str()) {
                return Err(invalid("wrong issuer"));
            }
        }
        Ok(claims)
    }

    fn personal_channel(&self, sub: Option<&str>) -> Option<String> {
        let template = self.user_channel.as_deref()?;
        let sub = sub.filter(|s| !s.is_empty())?;
        let channel = template.replace(SUB_PLACEHOLDER, sub);
        // A template like "{sub}" must not turn a `sub` into one of Redis's own channels.
        let reserved = is_redis_internal(&channel) && !is_redis_internal(template);
        (!reserved).then_some(channel)
    }
}

/// Mints an HS256 token granting reading `channels`, publishing to `publish` (and `sub`),
/// valid for `ttl`. For development and tests: production tokens come from the application's
/// own auth service.
pub fn mint_token(
    secret: &str,
    channels: &[String],
    publish: &[String],
    sub: Option<&str>,
    ttl: Duration,
) -> Result<String, String> {
    for pattern in channels.iter().chain(publish) {
        Pattern::parse(pattern)?;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?;
    let mut claims = serde_json::json!({
        "exp": (now + ttl).as_secs(),
        "iat": now.as_secs(),
        "channels": channels,
    });
    if !publish.is_empty() {
        claims["publish"] = serde_json::Value::from(publish);
    }
    if let Some(sub) = sub {
        claims["sub"] = serde_json::Value::from(sub);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| e.to_string())
}

fn validation(algorithm: Algorithm, settings: &AuthSettings) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = settings.leeway_secs;
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    validation.validate_aud = settings.audience.is_some();
    if let Some(audience) = &settings.audience {
        validation.set_audience(&[audience]);
        required.push("aud");
    }
    if let Some(issuer) = &settings.issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// Reads a PEM public key: RSA (RS256) or EC P-256 (ES256).
fn public_key(pem: &[u8]) -> Option<(DecodingKey, Algorithm)> {
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Some((key, Algorithm::RS256));
    }
    DecodingKey::from_ec_pem(pem)
        .ok()
        .map(|key| (key, Algorithm::ES256))
}

/// A short reason for a rejected token, without echoing the token.
fn describe(error: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind::*;
    match error.kind() {
        ExpiredSignature => "expired".to_string(),
        ImmatureSignature => "not valid yet".to_string(),
        InvalidSignature => "bad signature".to_string(),
        InvalidAudience => "wrong audience".to_string(),
        InvalidIssuer => "wrong issuer".to_string(),
        InvalidAlgorithm => "algorithm not accepted".to_string(),
        MissingRequiredClaim(claim) => format!("missing `{claim}` claim"),
        _ => "malformed".to_string(),
    }
}

/// The value of the first cookie `name`, if the request carries it. Headers are read as bytes:
/// another cookie's non-ASCII value (`pref=café`) must not hide the token.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|byte| *byte == b';'))
        .filter_map(|pair| {
            let at = pair.iter().position(|byte| *byte == b'=')?;
            Some((pair[..at].trim_ascii(), pair[at + 1..].trim_ascii()))
        })
        .find(|(key, _)| *key == name.as_bytes())
        .map(|(_, value)| {
            let value = value.strip_prefix(b"\"").unwrap_or(value);
            let value = value.strip_suffix(b"\"").unwrap_or(value);
            String::from_utf8_lossy(value).into_owned()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn minted_tokens_are_accepted_for_their_grants() {
        let settings = AuthSettings {
            jwt_secret: serde_json::from_value(serde_json::json!("s3cret")).ok(),
            user_channel: Some("user:{sub}".to_string()),
            ..AuthSettings::default()
        };
        let authorizer = Authorizer::new(PublicChannels::default(), &settings).expect("valid");
        let grants = vec!["orders:*".to_string()];
        let token =
            mint_token("s3cret", &grants, &[], Some("7"), Duration::from_secs(60)).expect("mint");
        let mut headers = HeaderMap::new();
        let bearer = format!("Bearer {token}");
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&bearer).expect("header"),
        );
        let wanted = ["orders:1".to_string(), "user:7".to_string()];
        assert!(authorizer.authorize(&headers, None, &wanted).is_ok());
        let other = ["user:8".to_string()];
        assert!(matches!(
            authorizer.authorize(&headers, None, &other),
            Err(Denied::Forbidden(_))
        ));
    }

    #[test]
    fn publishing_needs_a_token_with_a_matching_publish_claim() {
        let settings = AuthSettings {
            jwt_secret: serde_json::from_value(serde_json::json!("s3cret")).ok(),
            ..AuthSettings::default()
        };
        let public = PublicChannels::new(&["*".to_string()]).expect("pattern");
        let authorizer = Authorizer::new(public, &settings).expect("valid");
        let ttl = Duration::from_secs(60);
        let reader = mint_token("s3cret", &["*".to_string()], &[], None, ttl).expect("mint");
        let writer = mint_token("s3cret", &[], &["orders:*".to_string()], None, ttl).expect("mint");
        let denied = |token: Option<&str>, channel: &str| {
            authorizer.authorize_publish(&HeaderMap::new(), token, channel)
        };
        assert!(matches!(
            denied(None, "orders:1"),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            denied(Some("x.y.z"), "orders:1"),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            denied(Some(&reader), "orders:1"),
            Err(Denied::Forbidden(_))
        ));
        assert!(matches!(
            denied(Some(&writer), "news"),
            Err(Denied::Forbidden(_))
        ));
        assert_eq!(denied(Some(&writer), "orders:1"), Ok(()));
        // Publishing grants no reading.
        let channels = ["orders:1".to_string()];
        let read = authorizer.authorize(&HeaderMap::new(), Some(&writer), &channels);
        assert!(read.is_ok(), "public channels stay readable: {read:?}");
        let closed = Authorizer::new(PublicChannels::default(), &settings).expect("valid");
        let read = closed.authorize(&HeaderMap::new(), Some(&writer), &channels);
        assert!(matches!(read, Err(Denied::Forbidden(_))), "{read:?}");
        // Without a key nobody publishes.
        let open = Authorizer::new(PublicChannels::default(), &AuthSettings::default());
        let open = open.expect("valid");
        let refused = open.authorize_publish(&HeaderMap::new(), Some(&writer), "orders:1");
        assert!(
            matches!(refused, Err(Denied::Unauthenticated(_))),
            "{refused:?}"
        );
    }

    #[test]
    fn cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            COOKIE,
            HeaderValue::from_static("a=1; ssehub_token=tok; b=2"),
        );
        assert_eq!(cookie(&headers, "ssehub_token").as_deref(), Some("tok"));
        assert_eq!(cookie(&headers, "missing"), None);
    }

    #[test]
    fn a_non_ascii_cookie_does_not_hide_the_first_token_cookie() {
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_bytes("pref=café; ssehub_token=\"tok\"".as_bytes());
        headers.insert(COOKIE, value.expect("header"));
        headers.append(COOKIE, HeaderValue::from_static("ssehub_token=second"));
        assert_eq!(cookie(&headers, "ssehub_token").as_deref(), Some("tok"));
    }
}
