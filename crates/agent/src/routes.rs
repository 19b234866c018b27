//! The agent's HTTP endpoint (every route needs the cluster token): rank logs' tails, in-memory
//! checkpoint files (served to a restarting node, received from a buddy), `/metrics`, the
//! controller's doorbell and fault injection.

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Router};
use hyper::body::Bytes;
use net::http::{require_token, ApiError, METRICS_CONTENT_TYPE};
use proto::api::{JobId, MAX_LOG_TAIL_BYTES};
use proto::checkpoint as layout;
use serde::Deserialize;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use crate::{chaos, checkpoints, Agent};

/// Largest checkpoint file one PUT may carry.
const MAX_CHECKPOINT_FILE_BYTES: usize = 16 << 30;

pub(crate) fn router(agent: Arc<Agent>) -> Router {
    let token: Arc<str> = agent.cfg.token.clone().into();
    Router::new()
        .route("/v1/logs/{job}/{attempt}/{rank}/{stream}", get(serve_log))
        .route("/v1/wake", post(wake))
        .route("/metrics", get(serve_metrics))
        .route("/v1/chaos", post(chaos::inject))
        .route(
            "/v1/checkpoints/{job}/{step}/{file}",
            get(serve_checkpoint_file)
                .put(receive_checkpoint_file)
                .layer(DefaultBodyLimit::max(MAX_CHECKPOINT_FILE_BYTES)),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(middleware::from_fn_with_state(token, require_token))
        .with_state(agent)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TailQuery {
    tail_bytes: Option<u64>,
    /// Instead of a tail: the bytes from this offset on (at most the tail limit), for a reader
    /// that follows the log as it grows.
    offset: Option<u64>,
}

/// The last `tail_bytes` of a rank's stdout or stderr, or its bytes from `offset` on. Every path segment is a parsed number or one
/// of two fixed names, so no request can reach outside the agent's job directory.
async fn serve_log(
    State(agent): State<Arc<Agent>>,
    path: Result<Path<(JobId, u32, u32, String)>, PathRejection>,
    q: Result<Query<TailQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path((job, attempt, rank, stream)) =
        path.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let Query(q) = q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    if stream != "stdout" && stream != "stderr" {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("stream {stream:?} must be stdout or stderr"),
        ));
    }
    let file = agent.cfg.work_dir.join(format!("jobs/{job}/attempt-{attempt}/rank-{rank}.{stream}"));
    if q.offset.is_some() && q.tail_bytes.is_some() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "give offset or tail_bytes, not both"));
    }
    let tail = q.tail_bytes.unwrap_or(MAX_LOG_TAIL_BYTES).min(MAX_LOG_TAIL_BYTES);
    let read = || -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(&file)?;
        let len = f.metadata()?.len();
        let start = q.offset.map_or(len.saturating_sub(tail), |o| o.min(len));
        f.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        f.take(MAX_LOG_TAIL_BYTES.min(tail)).read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    match read() {
        Ok(bytes) => Ok(([("content-type", "text/plain; charset=utf-8")], bytes).into_response()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no {stream} log for job {job} attempt {attempt} local rank {rank} on node {}",
                agent.cfg.name
            ),
        )),
        Err(e) => {
            Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("reading {}: {e}", file.display())))
        }
    }
}

fn checkpoint_path(agent: &Agent, job: JobId, step: u64, file: &str) -> Result<PathBuf, ApiError> {
    if !layout::valid_file_name(file) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{file:?} is not a checkpoint file name"),
        ));
    }
    Ok(agent.job_memory(job).join(layout::step_dir_name(step)).join(file))
}

/// A file of an in-memory checkpoint this node holds (a restarting node fetches it).
async fn serve_checkpoint_file(
    State(agent): State<Arc<Agent>>,
    path: Result<Path<(JobId, u64, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((job, step, file)) = path.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let path = checkpoint_path(&agent, job, step, &file)?;
    match tokio::fs::read(&path).await {
        Ok(bytes) => Ok(([("content-type", "application/octet-stream")], bytes).into_response()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("node {} holds no {file} of job {job} step {step}", agent.cfg.name),
        )),
        Err(e) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{}: {e}", path.display()))),
    }
}

/// A file of a buddy's checkpoint. Files arrive in a temporary directory; the manifest comes last
/// and commits the directory by renaming it, so a half-received checkpoint never counts.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutQuery {
    /// The attempt that wrote the checkpoint.
    attempt: Option<u32>,
}

/// Whether a copy from `attempt` comes from an attempt superseded by one this node launched.
fn superseded(newest_launched: Option<u32>, attempt: Option<u32>) -> bool {
    matches!((newest_launched, attempt), (Some(newest), Some(a)) if a < newest)
}

async fn receive_checkpoint_file(
    State(agent): State<Arc<Agent>>,
    path: Result<Path<(JobId, u64, String)>, PathRejection>,
    q: Result<Query<PutQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path((job, step, file)) = path.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let Query(q) = q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    checkpoint_path(&agent, job, step, &file)?;
    // A leader cut off from the controller, not from its buddy, may still send the copies of an
    // attempt the job has left: they must not replace the new attempt's.
    let newest = agent.node.lock().expect("agent state").newest_attempt(job);
    if superseded(newest, q.attempt) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "step {step} of job {job} attempt {} refused: this node runs attempt {}",
                q.attempt.unwrap_or_default(),
                newest.unwrap_or_default()
            ),
        ));
    }
    let root = agent.job_memory(job);
    let incoming = root.join(layout::hidden_dir_name(step, "incoming"));
    let io = |e: std::io::Error| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{}: {e}", incoming.display()))
    };
    std::fs::create_dir_all(&incoming).map_err(io)?;
    std::fs::write(incoming.join(&file), &body).map_err(io)?;
    if file == layout::MANIFEST {
        let fin = root.join(layout::step_dir_name(step));
        let _ = std::fs::remove_dir_all(&fin);
        std::fs::rename(&incoming, &fin).map_err(io)?;
        layout::prune(&root, checkpoints::KEEP_IN_MEMORY);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn serve_metrics(State(agent): State<Arc<Agent>>) -> Response {
    let (running, exited) = {
        let node = agent.node.lock().expect("agent state");
        let running = node.state.ranks.values().filter(|r| r.state.is_running()).count();
        (running, node.state.ranks.len() - running)
    };
    let text = agent.metrics.render(running, exited, &agent.gpus.lock().expect("gpu state"));
    ([("content-type", METRICS_CONTENT_TYPE)], text).into_response()
}

/// The controller has commands for this node: heartbeat now.
async fn wake(State(agent): State<Arc<Agent>>) -> StatusCode {
    agent.wake.notify_one();
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_from_an_attempt_older_than_one_launched_here_is_refused() {
        assert!(superseded(Some(3), Some(2)));
        assert!(!superseded(Some(3), Some(3)) && !superseded(Some(3), Some(4)));
        assert!(!superseded(None, Some(0)), "a buddy that runs none of the job's ranks");
        assert!(!superseded(Some(3), None), "an agent that does not say");
    }

    #[test]
    fn checkpoint_file_names_cannot_leave_the_step_directory() {
        for bad in ["../token", ".hidden", "a/b", ""] {
            assert!(!layout::valid_file_name(bad), "{bad:?}");
        }
        assert!(layout::valid_file_name("optimizer.rank3.safetensors"));
    }
}
