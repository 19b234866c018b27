//! The progress protocol (rank → agent): one JSON object per line on the agent's Unix socket
//! (MYRIAD_AGENT_SOCKET). Optional for foreign programs: the agent ignores lines it cannot read,
//! and a rank that never speaks is never judged hung by it.

use serde::{Deserialize, Serialize};

use crate::api::JobId;

/// Longest line the agent reads; a longer one ends the connection.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressEvent {
    /// A step ended: `step`, its `loss`, `tokens`, `step_ms`, `compute_ms` and `mfu`.
    StepEnd,
    /// A checkpoint of `step` is complete in the agent's memory directory.
    Checkpoint,
    /// Anything else a rank says (a step begun, a phase): progress, nothing more.
    #[serde(other)]
    Other,
}

/// One message. Every message is progress (the hang detector's clock restarts); a step end also
/// carries the step's figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub job_id: JobId,
    pub attempt: u32,
    pub local_rank: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<ProgressEvent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Tokens the step processed (over every rank's share it speaks for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_ms: Option<f64>,
    /// The step less its waits on collectives: what tells a straggler apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// forward, backward, allreduce, checkpoint: shown in a hang report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

impl Progress {
    /// A message of `event` from this rank, with no figures yet.
    pub fn new(job_id: JobId, attempt: u32, local_rank: u32, event: ProgressEvent) -> Progress {
        Progress {
            job_id,
            attempt,
            local_rank,
            event: Some(event),
            step: None,
            loss: None,
            tokens: None,
            step_ms: None,
            compute_ms: None,
            mfu: None,
            phase: None,
        }
    }

    /// The message as one line, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("a progress message serialises");
        line.push('\n');
        line
    }

    /// Reads one line; None for anything that is not a progress message.
    pub fn parse(line: &[u8]) -> Option<Progress> {
        serde_json::from_slice(line).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_end_reads_back_and_foreign_lines_are_tolerated() {
        let mut p = Progress::new(3, 1, 2, ProgressEvent::StepEnd);
        (p.step, p.loss, p.tokens, p.step_ms, p.mfu) =
            (Some(9), Some(2.5), Some(4096), Some(120.0), Some(0.4));
        let line = p.to_line();
        assert!(line.ends_with('\n') && line.len() < MAX_LINE_BYTES);
        assert_eq!(Progress::parse(line.as_bytes()), Some(p));
        // A program of its own may say other things, or say them its own way.
        let begun = Progress::parse(
            br#"{"job_id":3,"attempt":1,"local_rank":0,"event":"step_begin","phase":"forward"}"#,
        );
        assert_eq!(
            begun.map(|p| (p.event, p.phase)),
            Some((Some(ProgressEvent::Other), Some("forward".into())))
        );
        assert_eq!(Progress::parse(b"not json"), None);
        assert_eq!(Progress::parse(br#"{"step":1}"#), None, "a message names its rank");
    }
}
