//! CORS for the public listener: an allowlist of exact origins, optional credentials.
//!
//! EventSource from another origin makes a plain GET (with `withCredentials` for cookies); a
//! reconnect carrying `Last-Event-ID`, or a polyfill sending `Authorization`, is preflighted. An
//! origin not on the list gets no CORS headers at all, so the browser refuses the response.

use http::header::{
    HeaderValue, ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS,
    ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE, VARY,
};
use http::{Response, StatusCode};

use super::ResponseBody;

/// Request headers a cross-origin stream may carry.
const ALLOWED_HEADERS: &str = "Last-Event-ID, Authorization, Cache-Control, Accept";
/// How long browsers may cache a preflight answer, in seconds.
const PREFLIGHT_MAX_AGE: &str = "600";

/// The configured CORS policy.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cors {
    origins: Vec<String>,
    any_origin: bool,
    credentials: bool,
}

impl Cors {
    pub(crate) fn new(origins: &[String], credentials: bool) -> Cors {
        Cors {
            any_origin: origins.iter().any(|o| o == "*"),
            origins: origins.iter().filter(|o| *o != "*").cloned().collect(),
            credentials,
        }
    }

    /// The `Access-Control-Allow-Origin` value for a request's `Origin`, if it is allowed.
    fn allowed_origin(&self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        let origin = origin?;
        let text = origin.to_str().ok()?;
        if self.origins.iter().any(|o| o == text) {
            return Some(origin.clone());
        }
        // `*` never combines with credentials (refused at start-up), so a literal `*` is right.
        self.any_origin.then(|| HeaderValue::from_static("*"))
    }

    /// Adds CORS headers to a response (stream or error) for an allowed origin.
    pub(crate) fn decorate(
        &self,
        origin: Option<&HeaderValue>,
        response: &mut Response<ResponseBody>,
    ) {
        let headers = response.headers_mut();
        if self.any_origin || !self.origins.is_empty() {
            // The answer depends on Origin: caches must not reuse it for another origin.
            headers.append(VARY, HeaderValue::from_static("Origin"));
        }
        let Some(origin) = self.allowed_origin(origin) else {
            return;
        };
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if self.credentials {
            headers.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }

    /// Answers a preflight `OPTIONS` request: `204`, with CORS headers only for allowed origins.
    pub(crate) fn preflight(&self, origin: Option<&HeaderValue>) -> Response<ResponseBody> {
        let mut response = Response::new(ResponseBody::Left(Default::default()));
        *response.status_mut() = StatusCode::NO_CONTENT;
        self.decorate(origin, &mut response);
        if self.allowed_origin(origin).is_some() {
            let headers = response.headers_mut();
            headers.insert(
                ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET"),
            );
            headers.insert(
                ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(ALLOWED_HEADERS),
            );
            headers.insert(
                ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static(PREFLIGHT_MAX_AGE),
            );
        }
        response
    }
}
