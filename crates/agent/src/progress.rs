//! The agent's end of the progress protocol (`proto::progress`): it reads the ranks' lines on its
//! Unix socket and keeps each rank's step, loss, step times, compute times and phase, which feed
//! hang detection, straggler detection, tokens/s and MFU.

use proto::api::StepTime;
use proto::progress::{Progress, ProgressEvent, MAX_LINE_BYTES};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};

use crate::state::{Rank, COMPUTE_WINDOW, STEPS_KEPT};
use crate::{unix_ms, Agent};

/// Records one message of `r`'s at `now` (`end_ms` on the agent's clock).
pub(crate) fn record(r: &mut Rank, p: &Progress, now: Instant, end_ms: u64) {
    r.last_progress = now;
    r.speaks = true;
    if p.phase.is_some() {
        r.phase = p.phase.clone();
    }
    if p.event != Some(ProgressEvent::StepEnd) {
        return;
    }
    r.phase = None;
    r.step = p.step.or(r.step);
    r.loss = p.loss.or(r.loss);
    r.mfu = p.mfu.or(r.mfu);
    // A step time no clock can give (negative, NaN, over a day) is not one.
    let step_ms = p.step_ms.filter(|ms| ms.is_finite() && *ms >= 0.0 && *ms <= 86_400_000.0);
    if let (Some(step), Some(ms)) = (p.step, step_ms) {
        if let Some(tokens) = p.tokens {
            r.tokens_per_s = Some(tokens as f64 / (ms / 1e3));
        }
        r.steps.push_back(StepTime { step, ms, end_ms });
        if r.steps.len() > STEPS_KEPT {
            r.steps.pop_front();
        }
    }
    if let Some(ms) = p.compute_ms.filter(|ms| ms.is_finite() && *ms >= 0.0) {
        r.compute_ms.push_back(ms);
        if r.compute_ms.len() > COMPUTE_WINDOW {
            r.compute_ms.pop_front();
        }
    }
}

pub(crate) async fn accept(agent: Arc<Agent>, listener: tokio::net::UnixListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: back off rather than spin the agent's only thread.
                say!("agent {}: progress socket: {e}", agent.cfg.name);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(read_lines(agent.clone(), stream));
    }
}

async fn read_lines(agent: Arc<Agent>, stream: tokio::net::UnixStream) {
    let mut reader = tokio::io::BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // A line longer than the limit ends the connection instead of growing the buffer.
        let limit = MAX_LINE_BYTES as u64 + 1;
        match (&mut reader).take(limit).read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) if n as u64 >= limit => return,
            Ok(_) => {}
        }
        // Unknown or malformed messages are ignored: the protocol is optional for ranks.
        let Some(p) = Progress::parse(&buf) else { continue };
        if p.event == Some(ProgressEvent::Checkpoint) {
            if let Some(step) = p.step {
                agent.checkpoint_taken(p.job_id, p.attempt, step);
            }
            continue;
        }
        let mut node = agent.node.lock().expect("agent state");
        if let Some(r) = node.state.ranks.get_mut(&(p.job_id, p.attempt, p.local_rank)) {
            record(r, &p, Instant::now(), unix_ms());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::api::RankState;

    fn step_end(step: u64, step_ms: f64, compute_ms: f64) -> Progress {
        let mut p = Progress::new(1, 0, 0, ProgressEvent::StepEnd);
        (p.step, p.loss, p.tokens, p.step_ms, p.compute_ms) =
            (Some(step), Some(3.0 / step as f64), Some(2048), Some(step_ms), Some(compute_ms));
        p
    }

    #[test]
    fn step_ends_keep_bounded_windows_and_any_message_is_progress() {
        let t0 = Instant::now();
        let mut r = Rank::new(RankState::Running { pid: 1 }, Some(1), t0);
        let mut phase = Progress::new(1, 0, 0, ProgressEvent::Other);
        phase.phase = Some("allreduce".into());
        let later = t0 + Duration::from_secs(1);
        record(&mut r, &phase, later, 1);
        assert!(r.speaks && r.last_progress == later);
        assert_eq!((r.phase.as_deref(), r.step), (Some("allreduce"), None));
        for step in 1..=40 {
            record(&mut r, &step_end(step, 500.0, 400.0), later, 1000 + step);
        }
        assert_eq!((r.step, r.phase.as_deref()), (Some(40), None), "a step end clears the phase");
        assert_eq!(r.tokens_per_s, Some(4096.0), "2,048 tokens in 0.5 s");
        assert_eq!((r.steps.len(), r.compute_ms.len()), (STEPS_KEPT, COMPUTE_WINDOW));
        assert_eq!(r.steps.front().map(|s| s.step), Some(40 - STEPS_KEPT as u64 + 1), "oldest dropped");
        // A compute time no clock can give is not a straggler signal.
        record(&mut r, &step_end(41, 500.0, f64::NAN), later, 2000);
        assert_eq!(r.compute_ms.back(), Some(&400.0));
    }
}
