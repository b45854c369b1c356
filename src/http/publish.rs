//! `POST /publish?channel=<name>`: the HTTP publish API. Checks the request (method, channel,
//! `Idempotency-Key`, `X-Correlation-Id`, token and its `publish` grant, body size, encoding
//! and the channel's JSON Schema, if `[[schemas]]` gives it one) and hands the payload to the
//! [`Publisher`](crate::publisher::Publisher). Every answer is counted in
//! `ssehub_publish_requests_total{status}` here, in one place.
//!
//! Each accepted publish is logged at `info` with its correlation id: the `X-Correlation-Id`
//! header, else the payload's `log.correlation_id_field`. The payload is published verbatim.
//!
//! The body is read only after the token is accepted, and never past
//! `limits.max_payload_bytes` (plus the rest of the frame that crossed it).

use std::future::Future;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

use super::events::{CHANNEL_PARAM, TOKEN_PARAM};
use super::{json_response, ApiError, EventsEndpoint, ResponseBody};
use crate::publisher::PublishError;

/// Header that makes a repeated publish answer like the first.
const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Longest accepted `Idempotency-Key`, as the function library's.
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;
/// Header naming the publish's correlation id in the log (it wins over the payload's field).
const CORRELATION_ID: &str = "x-correlation-id";
/// Longest accepted `X-Correlation-Id`, as much as a log line shows of one.
const MAX_CORRELATION_ID_BYTES: usize = crate::dead_letter::MAX_LOGGED_CORRELATION_ID;

/// A request body `/publish` can read, at most a limit of it. hyper's bodies; and `()`, the
/// fast path's, which never reaches `/publish` (it serves only `GET /events`).
pub(crate) trait PublishBody: Send {
    /// The whole body, or `None` when it is longer than `limit` bytes.
    fn read_at_most(
        self,
        limit: usize,
    ) -> impl Future<Output = Result<Option<Bytes>, String>> + Send;
}

impl PublishBody for hyper::body::Incoming {
    async fn read_at_most(self, limit: usize) -> Result<Option<Bytes>, String> {
        match Limited::new(self, limit).collect().await {
            Ok(collected) => Ok(Some(collected.to_bytes())),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Ok(None),
            Err(e) => Err(format!("cannot read the request body: {e}")),
        }
    }
}

impl PublishBody for () {
    async fn read_at_most(self, _limit: usize) -> Result<Option<Bytes>, String> {
        Ok(Some(Bytes::new()))
    }
}

/// Serves `/publish` (any method) and counts the answer.
pub(crate) async fn handle<B: PublishBody>(
    endpoint: &EventsEndpoint,
    request: Request<B>,
) -> Response<ResponseBody> {
    let response = match publish(endpoint, request).await {
        Ok(id) => json_response(StatusCode::OK, &serde_json::json!({ "id": id })),
        Err(refusal) => refusal.into_response(),
    };
    crate::metrics::publish_request(response.status().as_u16());
    response
}

async fn publish<B: PublishBody>(
    endpoint: &EventsEndpoint,
    request: Request<B>,
) -> Result<String, ApiError> {
    if request.method() != Method::POST {
        return Err(ApiError::MethodNotAllowedUsePost);
    }
    let (channel, query_token) =
        parse_query(request.uri().query()).map_err(ApiError::BadRequest)?;
    let idempotency_key = idempotency_key(request.headers()).map_err(ApiError::BadRequest)?;
    let header_correlation_id = correlation_id(request.headers()).map_err(ApiError::BadRequest)?;
    endpoint
        .authorizer
        .authorize_publish(request.headers(), query_token.as_deref(), &channel)?;
    let limit = endpoint.settings.limits.max_payload_bytes;
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "the payload is larger than {limit} bytes (limits.max_payload_bytes)"
        ))
    };
    if declared_length(request.headers()).is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    let payload = request
        .into_body()
        .read_at_most(limit)
        .await
        .map_err(ApiError::BadRequest)?
        .ok_or_else(too_large)?;
    let Ok(text) = std::str::from_utf8(&payload) else {
        return Err(ApiError::NotUtf8);
    };
    // The same check the hub makes on delivery: refused here, the publisher learns why.
    if let Some(schema) = endpoint.schemas.for_channel(&channel) {
        schema.check(text).map_err(ApiError::SchemaInvalid)?;
    }
    let id = endpoint
        .publisher
        .publish(&channel, &payload, idempotency_key.as_deref())
        .await
        .map_err(|error| match error {
            PublishError::TooLarge(message) => ApiError::PayloadTooLarge(message),
            PublishError::Rejected(message) => ApiError::BadRequest(message),
            PublishError::Unavailable(message) => {
                tracing::debug!(error = %message, "publish failed: Redis unavailable");
                ApiError::Unavailable(format!("Redis is unavailable; retry later ({message})"))
            }
        })?;
    let correlation_id =
        header_correlation_id.or_else(|| endpoint.hub.dead_letters().correlation_id(&payload));
    tracing::info!(
        channel,
        bytes = payload.len(),
        id,
        correlation_id = correlation_id.as_deref().map(crate::dead_letter::for_log),
        "published over HTTP"
    );
    Ok(id)
}

/// The channel (exactly one, named as for `/events`) and the `token` parameter, if any.
fn parse_query(query: Option<&str>) -> Result<(String, Option<String>), String> {
    let mut channel = None;
    let mut token = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            CHANNEL_PARAM if channel.is_some() => {
                return Err("exactly one `channel` query parameter is allowed".to_string())
            }
            CHANNEL_PARAM => {
                crate::channels::validate_name(&value)?;
                channel = Some(value.into_owned());
            }
            // The first wins, as for `/events`.
            TOKEN_PARAM if token.is_none() => token = Some(value.into_owned()),
            TOKEN_PARAM => {}
            other => {
                let shown: String = other.chars().take(64).collect();
                return Err(format!("unknown query parameter `{shown}`"));
            }
        }
    }
    let channel = channel.ok_or("a `channel` query parameter is required")?;
    Ok((channel, token))
}

/// The `Idempotency-Key` header, if sent: one header of 1 to 128 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, String> {
    short_header(headers, IDEMPOTENCY_KEY, MAX_IDEMPOTENCY_KEY_BYTES)
        .map_err(|rule| format!("Idempotency-Key must be {rule}"))
}

/// The `X-Correlation-Id` header, if sent: one header of 1 to 128 visible ASCII characters.
fn correlation_id(headers: &HeaderMap) -> Result<Option<String>, String> {
    short_header(headers, CORRELATION_ID, MAX_CORRELATION_ID_BYTES)
        .map_err(|rule| format!("X-Correlation-Id must be {rule}"))
}

/// The header `name`, if sent, when it is one header of 1 to `max` visible ASCII characters
/// (safe to log and to store as is); otherwise that rule, for the error message.
fn short_header(headers: &HeaderMap, name: &str, max: usize) -> Result<Option<String>, String> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    let visible = bytes.iter().all(|byte| (0x21..=0x7e).contains(byte));
    if values.next().is_some() || bytes.is_empty() || bytes.len() > max || !visible {
        return Err(format!("one header of 1 to {max} visible ASCII characters"));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// The `Content-Length` the client declared, when it is a number.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn exactly_one_valid_channel_is_required() {
        assert_eq!(
            parse_query(Some("channel=orders%3A1&token=t")),
            Ok(("orders:1".to_string(), Some("t".to_string())))
        );
        for bad in [
            None,
            Some(""),
            Some("channel="),
            Some("channel=a+b"),
            Some("channel=a&channel=b"),
            Some("channel=a&lastEventId=1"),
        ] {
            assert!(parse_query(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn idempotency_keys_are_visible_ascii_up_to_128() {
        let key = |value: &[u8]| {
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_bytes(value) {
                headers.insert(IDEMPOTENCY_KEY, value);
            }
            idempotency_key(&headers)
        };
        assert_eq!(key(b"order-42:v1"), Ok(Some("order-42:v1".to_string())));
        assert_eq!(key(&[b'k'; 128]), Ok(Some("k".repeat(128))));
        assert!(key(&[b'k'; 129]).is_err());
        assert!(key(b"two words").is_err());
        assert!(key("caf\u{e9}".as_bytes()).is_err());
        assert_eq!(idempotency_key(&HeaderMap::new()), Ok(None));
        let mut twice = HeaderMap::new();
        twice.append(IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        twice.append(IDEMPOTENCY_KEY, HeaderValue::from_static("b"));
        assert!(idempotency_key(&twice).is_err());
    }

    #[test]
    fn correlation_ids_are_visible_ascii_up_to_128() {
        let id = |value: &[u8]| {
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_bytes(value) {
                headers.insert(CORRELATION_ID, value);
            }
            correlation_id(&headers)
        };
        assert_eq!(id(b"req-42"), Ok(Some("req-42".to_string())));
        assert_eq!(id(&[b'c'; 128]), Ok(Some("c".repeat(128))));
        assert!(id(&[b'c'; 129]).is_err());
        assert!(id(b"two words").is_err());
        assert!(id("caf\u{e9}".as_bytes()).is_err());
        assert_eq!(correlation_id(&HeaderMap::new()), Ok(None));
    }
}
