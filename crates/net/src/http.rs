//! The server side both edges share: one JSON error type for every route, the token check that
//! runs before a body is read, the shutdown signal, and the metrics exposition's text format.

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use proto::api::{ErrorBody, MAX_BODY_BYTES};
use std::sync::Arc;

use crate::auth::bearer_matches;

/// The one error type of every route: a status and a message that names what was wrong.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into() }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: self.message })).into_response()
    }
}

impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> ApiError {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("request body exceeds the limit of {MAX_BODY_BYTES} bytes")
        } else {
            e.body_text()
        };
        ApiError::new(status, message)
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> ApiError {
        ApiError::bad_request(e.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> ApiError {
        ApiError::bad_request(e.body_text())
    }
}

/// 401 unless the request carries the cluster token; checked before the body is read.
pub async fn require_token(State(token): State<Arc<str>>, request: Request, next: Next) -> Response {
    let header = request.headers().get("authorization").map(|v| v.as_bytes());
    if !bearer_matches(header, &token) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong cluster token (Authorization: Bearer …)",
        )
        .into_response();
    }
    next.run(request).await
}

pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The media type of the exposition: Prometheus' classic text format, which every scraper and
/// `promtool check metrics` read.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rewrites prometheus-client's OpenMetrics text into the classic text format. The two differ
/// where it matters to readers: an OpenMetrics counter family `x` has samples `x_total`, while
/// the classic format names the family after its samples; `# UNIT` and `# EOF` do not exist.
pub fn to_classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find(|p| line.starts_with(p));
        match meta {
            Some(prefix) => {
                let rest = &line[prefix.len()..];
                let name = rest.split(' ').next().unwrap_or_default();
                if counters.contains(name) {
                    out.push_str(prefix);
                    out.push_str(name);
                    out.push_str("_total");
                    out.push_str(&rest[name.len()..]);
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_after_their_samples_and_openmetrics_only_lines_go() {
        let om = "# HELP a_jobs Jobs.\n# TYPE a_jobs gauge\na_jobs{state=\"x\"} 1\n# HELP a_faults Faults.\n# TYPE a_faults counter\n# UNIT a_faults faults\na_faults_total 3\n# EOF\n";
        let classic = to_classic_text(om);
        assert_eq!(
            classic,
            "# HELP a_jobs Jobs.\n# TYPE a_jobs gauge\na_jobs{state=\"x\"} 1\n# HELP a_faults_total Faults.\n# TYPE a_faults_total counter\na_faults_total 3\n"
        );
    }
}
