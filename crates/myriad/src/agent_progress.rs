//! The rank's side of the progress protocol: when a Myriad agent launched this process
//! (MYRIAD_AGENT_SOCKET is set), one JSON line per finished step goes to the agent's Unix socket.
//! Best effort by design: a rank never blocks or fails because its agent is slow or gone.

use serde_json::json;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

pub struct AgentProgress {
    stream: Option<UnixStream>,
    job_id: u64,
    attempt: u32,
    local_rank: u32,
}

impl AgentProgress {
    /// None unless this process runs under an agent.
    pub fn from_env() -> Option<AgentProgress> {
        let var = |k: &str| std::env::var(k).ok();
        let socket = var("MYRIAD_AGENT_SOCKET")?;
        let job_id = var("MYRIAD_JOB_ID")?.parse().ok()?;
        let attempt = var("MYRIAD_ATTEMPT")?.parse().ok()?;
        let local_rank = var("LOCAL_RANK").and_then(|v| v.parse().ok()).unwrap_or(0);
        let stream = UnixStream::connect(&socket).ok()?;
        stream.set_write_timeout(Some(Duration::from_millis(50))).ok()?;
        Some(AgentProgress { stream: Some(stream), job_id, attempt, local_rank })
    }

    pub fn step_end(&mut self, s: &train::StepStats, mfu: f64) {
        let line = json!({
            "job_id": self.job_id, "attempt": self.attempt, "local_rank": self.local_rank,
            "event": "step_end", "step": s.step, "loss": s.loss, "tokens": s.tokens, "step_ms": s.step_ms,
            "compute_ms": s.compute_ms, "mfu": mfu,
        });
        self.send(line);
    }

    /// A checkpoint of `step` is complete in the agent's memory directory.
    pub fn checkpoint(&mut self, step: u64) {
        let line = json!({
            "job_id": self.job_id, "attempt": self.attempt, "local_rank": self.local_rank,
            "event": "checkpoint", "step": step,
        });
        self.send(line);
    }

    /// One line; after a failed write the agent is considered gone and nothing more is sent.
    fn send(&mut self, line: serde_json::Value) {
        let Some(stream) = self.stream.as_mut() else { return };
        if writeln!(stream, "{line}").is_err() {
            self.stream = None;
        }
    }
}
