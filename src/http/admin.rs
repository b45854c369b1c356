//! The admin listener's endpoints: liveness and readiness (metrics come with observability).

use std::sync::Arc;

use http::{Response, StatusCode};

use super::{json_response, ResponseBody};
use crate::hub::Hub;

/// Health and readiness, for load balancers and orchestrators.
#[derive(Debug)]
pub(crate) struct AdminEndpoint {
    pub(crate) hub: Arc<Hub>,
}

impl AdminEndpoint {
    /// `200` while the process serves requests at all.
    pub(crate) fn healthz(&self) -> Response<ResponseBody> {
        json_response(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
    }

    /// `200` only while the Redis subscription connection is up.
    pub(crate) fn readyz(&self) -> Response<ResponseBody> {
        if self.hub.upstream_up() {
            json_response(StatusCode::OK, &serde_json::json!({ "status": "ready" }))
        } else {
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({ "status": "not ready", "reason": "redis subscription down" }),
            )
        }
    }
}
