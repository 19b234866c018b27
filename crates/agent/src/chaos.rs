//! Faults injected on purpose (`myriad chaos`, forwarded by the controller): kill, hang or slow a
//! rank, lose the node, cut it off from the controller, corrupt a persisted checkpoint.

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hyper::body::Bytes;
use net::http::ApiError;
use proto::api::{ChaosAction, ChaosRequest};
use proto::checkpoint as layout;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Agent;

/// The file a corruption flips a byte in: the weights every restore reads.
const MODEL_FILE: &str = "model.safetensors";

/// Injects a fault on this node (`myriad chaos`, through the controller).
pub(crate) async fn inject(
    State(agent): State<Arc<Agent>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let req: ChaosRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("chaos: {e}")))?;
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
    let rank_pid = || -> Result<u32, ApiError> {
        let (job, local) = (req.job_id.ok_or(bad("job_id missing".into()))?, req.rank.unwrap_or(0));
        let node = agent.node.lock().expect("agent state");
        node.state
            .ranks
            .iter()
            .filter(|(k, r)| k.0 == job && k.2 == local && r.state.is_running())
            .max_by_key(|(k, _)| k.1)
            .and_then(|(_, r)| r.pid)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    format!("no running local rank {local} of job {job} here"),
                )
            })
    };
    let seconds = req.seconds.unwrap_or(10.0);
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
        return Err(bad(format!("seconds {seconds} must be in (0, 3600]")));
    }
    match req.action {
        ChaosAction::KillRank => signal_pid(rank_pid()?, libc::SIGKILL),
        ChaosAction::HangRank => signal_pid(rank_pid()?, libc::SIGSTOP),
        ChaosAction::SlowRank => {
            let pid = rank_pid()?;
            let factor = req.factor.unwrap_or(2.0);
            if !(factor.is_finite() && factor > 1.0 && factor <= 100.0) {
                return Err(bad(format!("factor {factor} must be in (1, 100]")));
            }
            // Runs 1/factor of each 100 ms period, stopped the rest.
            tokio::spawn(async move {
                let period = Duration::from_millis(100);
                let run = period.div_f64(factor);
                let end = Instant::now() + Duration::from_secs_f64(seconds);
                while Instant::now() < end {
                    tokio::time::sleep(run).await;
                    signal_pid(pid, libc::SIGSTOP);
                    tokio::time::sleep(period - run).await;
                    signal_pid(pid, libc::SIGCONT);
                }
            });
        }
        ChaosAction::KillAgent => {
            say!("agent {}: chaos: exiting at once (node loss)", agent.cfg.name);
            // Answer first, then vanish without cleanup, the way a node dies.
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                std::process::exit(137);
            });
        }
        ChaosAction::Partition => {
            *agent.silent_until.lock().expect("agent state") =
                Some(Instant::now() + Duration::from_secs_f64(seconds));
        }
        ChaosAction::CorruptCheckpoint => {
            let job = req.job_id.ok_or(bad("job_id missing".into()))?;
            let dir =
                agent.node.lock().expect("agent state").leading.get(&job).map(|l| l.persist_dir.clone());
            let dir = dir.ok_or_else(|| {
                ApiError::new(StatusCode::CONFLICT, format!("this node does not lead job {job}"))
            })?;
            let step = layout::complete_steps(&dir).unwrap_or_default().into_iter().max();
            let step = step.ok_or_else(|| {
                ApiError::new(StatusCode::CONFLICT, format!("job {job} has no persisted checkpoint yet"))
            })?;
            let file = dir.join(layout::step_dir_name(step)).join(MODEL_FILE);
            flip_middle_byte(&file).map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{}: {e}", file.display()))
            })?;
            say!("agent {}: chaos: corrupted {}", agent.cfg.name, file.display());
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn signal_pid(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on one of our ranks.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

fn flip_middle_byte(path: &FsPath) -> std::io::Result<()> {
    let mut bytes = std::fs::read(path)?;
    let mid = bytes.len() / 2;
    if let Some(b) = bytes.get_mut(mid) {
        *b ^= 0xff;
    }
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupted_file_differs_in_exactly_one_byte() {
        let dir = std::env::temp_dir().join(format!("myriad-agent-chaos-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(MODEL_FILE);
        std::fs::write(&file, [1u8, 2, 3, 4, 5]).unwrap();
        flip_middle_byte(&file).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), [1u8, 2, 3 ^ 0xff, 4, 5]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
