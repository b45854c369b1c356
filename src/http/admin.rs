//! The admin listener's endpoints: liveness, readiness and Prometheus metrics.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::{Either, Full};
use metrics_exporter_prometheus::PrometheusHandle;

use super::{json_response, ResponseBody};
use crate::hub::Hub;
use crate::metrics;

/// Health and readiness, for load balancers and orchestrators.
#[derive(Debug)]
pub(crate) struct AdminEndpoint {
    pub(crate) hub: Arc<Hub>,
    /// Cancelled when draining starts: from then on the instance reports not ready.
    pub(crate) draining: tokio_util::sync::CancellationToken,
    /// Set to the name of a long-lived task that failed: the instance reports not ready.
    pub(crate) failure: Arc<std::sync::OnceLock<&'static str>>,
    /// `None` when another metrics recorder owns the process (embedding); `/metrics` is then empty.
    pub(crate) metrics: Option<PrometheusHandle>,
}

impl AdminEndpoint {
    /// `200` while the process serves requests at all.
    pub(crate) fn healthz(&self) -> Response<ResponseBody> {
        json_response(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
    }

    /// The Prometheus text exposition of every `ssehub_*` series.
    pub(crate) fn metrics(&self) -> Response<ResponseBody> {
        let text = self
            .metrics
            .as_ref()
            .map(|handle| {
                // These gauges visit every channel: measured per scrape, not on a timer.
                let size = self.hub.measure();
                metrics::history_size(size.events, size.bytes);
                metrics::redis_channels(size.subscribed);
                handle.render()
            })
            .unwrap_or_default();
        let mut response = Response::new(Either::Left(Full::new(Bytes::from(text))));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    }

    /// `200` only while the Redis subscription connection is up.
    pub(crate) fn readyz(&self) -> Response<ResponseBody> {
        if let Some(task) = self.failure.get() {
            let reason = format!("the {task} task failed");
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({ "status": "not ready", "reason": reason }),
            )
        } else if self.draining.is_cancelled() {
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({ "status": "not ready", "reason": "draining" }),
            )
        } else if self.hub.upstream_up() {
            json_response(StatusCode::OK, &serde_json::json!({ "status": "ready" }))
        } else {
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({ "status": "not ready", "reason": "redis subscription down" }),
            )
        }
    }
}
