//! The admin listener's endpoints: liveness, readiness (with the Redis topology: mode, shards
//! known and up) and Prometheus metrics.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::{Either, Full};
use metrics_exporter_prometheus::PrometheusHandle;

use super::{json_response, ResponseBody};
use crate::config::RedisMode;
use crate::hub::Hub;
use crate::metrics;

/// Health and readiness, for load balancers and orchestrators.
#[derive(Debug)]
pub(crate) struct AdminEndpoint {
    pub(crate) hub: Arc<Hub>,
    /// `redis.mode`, reported by `/readyz` with the hub's shard counts.
    pub(crate) redis_mode: RedisMode,
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

    /// `200` only while the Redis subscription connection is up. Every answer also describes
    /// the Redis topology, so a `503` shows which part of it is missing.
    pub(crate) fn readyz(&self) -> Response<ResponseBody> {
        let redis = self.redis_topology();
        if let Some(task) = self.failure.get() {
            let reason = format!("the {task} task failed");
            not_ready(&reason, redis)
        } else if self.draining.is_cancelled() {
            not_ready("draining", redis)
        } else if self.hub.upstream_up() {
            json_response(
                StatusCode::OK,
                &serde_json::json!({ "status": "ready", "redis": redis }),
            )
        } else {
            not_ready("redis subscription down", redis)
        }
    }

    /// The `redis` object of `/readyz`: the configured mode and the shard counts the upstream
    /// last reported.
    fn redis_topology(&self) -> serde_json::Value {
        let (known, up) = self.hub.shards();
        serde_json::json!({
            "mode": mode_name(self.redis_mode),
            "shards_known": known,
            "shards_up": up,
        })
    }
}

/// A `503` readiness answer.
fn not_ready(reason: &str, redis: serde_json::Value) -> Response<ResponseBody> {
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &serde_json::json!({ "status": "not ready", "reason": reason, "redis": redis }),
    )
}

/// `redis.mode` as it is spelled in the configuration.
fn mode_name(mode: RedisMode) -> &'static str {
    match mode {
        RedisMode::Standalone => "standalone",
        RedisMode::Sentinel => "sentinel",
        RedisMode::Cluster => "cluster",
    }
}
