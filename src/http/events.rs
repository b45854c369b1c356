//! `GET /events`: validates the request, leases the channels, waits for their subscriptions and
//! opens the SSE stream.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, Request, Response, StatusCode};

use super::stream::{EventStream, StreamStart};
use super::{ApiError, ResponseBody};
use crate::auth::Authorizer;
use crate::channels;
use crate::config::Settings;
use crate::functions;
use crate::hub::Hub;

/// Header name EventSource uses to resume.
const LAST_EVENT_ID: &str = "last-event-id";
/// Query parameter naming a channel (may repeat; exactly once for `/publish`).
pub(super) const CHANNEL_PARAM: &str = "channel";
/// Query parameter carrying the resume id for clients that cannot set headers.
const LAST_EVENT_ID_PARAM: &str = "lastEventId";
/// Query parameter carrying a JWT for clients that can send neither header nor cookie.
pub(super) const TOKEN_PARAM: &str = "token";

/// Everything `/events` needs, shared by all requests.
#[derive(Debug)]
pub(crate) struct EventsEndpoint {
    pub(crate) hub: Arc<Hub>,
    pub(crate) authorizer: Authorizer,
    pub(crate) cors: super::cors::Cors,
    pub(crate) admission: super::Admission,
    pub(crate) settings: Arc<Settings>,
    /// Started once when draining begins; every stream watches it.
    pub(crate) drain: Arc<crate::hub::Drain>,
    /// Serves `POST /publish` (which shares this endpoint's authorizer and settings).
    pub(crate) publisher: crate::publisher::Publisher,
    /// `[[schemas]]`: `POST /publish` refuses a body its channel's schema rejects.
    pub(crate) schemas: Arc<crate::schemas::Schemas>,
}

/// A parsed and validated `/events` query.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct StreamQuery {
    /// Distinct channels, in request order.
    pub(crate) channels: Vec<String>,
    /// `lastEventId` from the query string, if given.
    pub(crate) last_event_id: Option<String>,
    /// `token` from the query string, if given.
    pub(crate) token: Option<String>,
}

impl EventsEndpoint {
    pub(crate) async fn handle<B>(
        &self,
        request: Request<B>,
    ) -> Result<Response<ResponseBody>, ApiError> {
        let query = parse_query(
            request.uri().query(),
            self.settings.channels.max_per_connection,
        )
        .map_err(ApiError::BadRequest)?;
        let access = self.authorizer.authorize(
            request.headers(),
            query.token.as_deref(),
            &query.channels,
        )?;
        let peer = request.extensions().get::<super::Peer>();
        let connection = peer.and_then(|p| p.activity.clone());
        let peer = peer.map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |p| p.addr.ip());
        let admitted = self.admission.admit(peer, request.headers())?;
        let resume_from = resume_id(request.headers(), query.last_event_id.as_deref());

        if self.hub.redis_backend() {
            if let Some(name) = query
                .channels
                .iter()
                .find(|name| functions::key_base(name).is_none())
            {
                return Err(ApiError::BadRequest(format!(
                    "channel {name:?}: with the redis backend a name with `}}` needs a {{hash tag}}"
                )));
            }
        }
        let lease = self
            .hub
            .acquire(&query.channels)
            .map_err(|full| ApiError::Overloaded(full.to_string()))?;
        let wait = Duration::from_secs(self.settings.redis.subscribe_timeout_secs);
        if !self.hub.wait_subscribed(&lease, wait).await {
            return Err(ApiError::Unavailable(
                "the Redis subscription for this channel is not available; retry later".to_string(),
            ));
        }
        if let (true, Some(id)) = (self.hub.redis_backend(), resume_from.as_deref()) {
            self.hub.wait_reachable(&lease, id, wait).await;
        }
        let start = StreamStart {
            resume_from: resume_from.as_deref(),
            retry_ms: self.settings.sse.retry_ms,
            heartbeat: self.settings.heartbeat(),
            shutdown_retry_jitter_ms: self.settings.server.shutdown_retry_jitter_ms,
            expires_at: access.expires_at,
            admitted,
            connection,
        };
        let stream = EventStream::open(self.hub.clone(), lease, start, self.drain.clone());
        let mut response = Response::new(ResponseBody::Right(stream));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        *response.status_mut() = StatusCode::OK;
        Ok(response)
    }
}

/// Runs everything `/events` does with a request before touching the hub: query parsing,
/// authorization and resume-id parsing. Used by the fuzz target; errors are the 4xx messages.
pub(crate) fn inspect_request(
    authorizer: &Authorizer,
    epoch: &crate::sse::Epoch,
    max_channels: usize,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Option<u64>, String> {
    let parsed = parse_query(query, max_channels)?;
    authorizer
        .authorize(headers, parsed.token.as_deref(), &parsed.channels)
        .map_err(|e| e.to_string())?;
    Ok(
        resume_id(headers, parsed.last_event_id.as_deref())
            .and_then(|id| epoch.parse_position(&id)),
    )
}

/// The resume id: the `Last-Event-ID` header, else the query parameter. Empty means fresh.
/// A header that is not even text is kept as an (unknown) position rather than ignored, so the
/// client is told it cannot be resumed.
fn resume_id(headers: &HeaderMap, from_query: Option<&str>) -> Option<String> {
    let id = match headers.get(LAST_EVENT_ID) {
        Some(value) => String::from_utf8_lossy(value.as_bytes()).into_owned(),
        None => from_query?.to_string(),
    };
    let id = id.trim().to_string();
    (!id.is_empty()).then_some(id)
}

/// Parses the query string of `/events`.
pub(crate) fn parse_query(query: Option<&str>, max_channels: usize) -> Result<StreamQuery, String> {
    let mut parsed = StreamQuery {
        channels: Vec::new(),
        last_event_id: None,
        token: None,
    };
    // Names seen so far: a linear de-duplication, whatever the number of names sent.
    let mut seen = std::collections::HashSet::new();
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            CHANNEL_PARAM => {
                channels::validate_name(&value)?;
                if seen.insert(value.clone()) {
                    parsed.channels.push(value.into_owned());
                }
            }
            LAST_EVENT_ID_PARAM => parsed.last_event_id = Some(value.into_owned()),
            // The first wins, as for the token's other sources (see `auth`).
            TOKEN_PARAM if parsed.token.is_none() => parsed.token = Some(value.into_owned()),
            TOKEN_PARAM => {}
            other => {
                let shown: String = other.chars().take(64).collect();
                return Err(format!("unknown query parameter `{shown}`"));
            }
        }
    }
    if parsed.channels.is_empty() {
        return Err("at least one `channel` query parameter is required".to_string());
    }
    if parsed.channels.len() > max_channels {
        return Err(format!(
            "too many channels: {} requested, at most {max_channels} allowed",
            parsed.channels.len()
        ));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_channels_count_once_and_keep_order() {
        let q = parse_query(Some("channel=b&channel=a&channel=b&lastEventId=x-1"), 2)
            .expect("valid query");
        assert_eq!(q.channels, vec!["b", "a"]);
        assert_eq!(q.last_event_id.as_deref(), Some("x-1"));
    }

    #[test]
    fn percent_encoded_names_are_decoded() {
        let q = parse_query(Some("channel=user%3A42"), 16).expect("valid query");
        assert_eq!(q.channels, vec!["user:42"]);
    }

    #[test]
    fn bad_queries_are_rejected() {
        for query in [
            None,
            Some(""),
            Some("channel="),
            Some("channel=a+b"),
            Some("chanel=a"),
        ] {
            assert!(parse_query(query, 16).is_err(), "{query:?}");
        }
        assert!(parse_query(Some("channel=a&channel=b&channel=c"), 2).is_err());
        let long = format!("channel={}", "x".repeat(257));
        assert!(parse_query(Some(&long), 16).is_err());
    }

    #[test]
    fn header_wins_over_query_and_empty_means_fresh() {
        let mut headers = HeaderMap::new();
        assert_eq!(resume_id(&headers, Some("q-1")).as_deref(), Some("q-1"));
        assert_eq!(resume_id(&headers, Some("")), None);
        headers.insert(LAST_EVENT_ID, HeaderValue::from_static("h-2"));
        assert_eq!(resume_id(&headers, Some("q-1")).as_deref(), Some("h-2"));
        headers.insert(LAST_EVENT_ID, HeaderValue::from_static(""));
        assert_eq!(resume_id(&headers, Some("q-1")), None);
    }
}
