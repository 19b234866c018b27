//! Hang detection: a rank that speaks the progress protocol and makes none for max(floor, factor ×
//! its median step) is hung; its threads' stacks are captured (the Python stack of a Python rank
//! through the agent's faulthandler hook, every thread's kernel side from /proc) and it is killed. The exit
//! wakes the heartbeat, and the controller ends the attempt: nobody waits for a collective's
//! deadline, let alone a 600 s watchdog.

use proto::api::HangReport;
use proto::node::RankKey;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::state::Rank;
use crate::supervisor::signal_groups;
use crate::Agent;

/// How often ranks are checked for hangs.
const HANG_CHECK_EVERY: Duration = Duration::from_millis(100);

/// The rule, from the agent's configuration.
#[derive(Clone, Copy, Debug)]
pub struct HangRule {
    pub floor: Duration,
    pub factor: f64,
    /// The allowance before a rank's first step (model build, restore, rendezvous).
    pub startup: Duration,
}

impl HangRule {
    /// How long `r` may go without progress. A stopped (T) or spinning (R) rank is a culprit; a
    /// sleeping one is most likely waiting on a culprit elsewhere, and gets half again as long so
    /// the culprit's report reaches the controller first and names the right rank.
    pub(crate) fn threshold(&self, r: &Rank, process_state: Option<char>) -> Duration {
        let threshold = match r.median_step_ms() {
            Some(ms) => {
                let scaled = Duration::try_from_secs_f64(self.factor * ms / 1e3).unwrap_or(Duration::MAX);
                self.floor.max(scaled)
            }
            None if r.step.is_none() => self.startup,
            None => self.floor,
        };
        let culprit = matches!(process_state, Some('T' | 't' | 'R'));
        if culprit {
            threshold
        } else {
            threshold.saturating_add(threshold / 2)
        }
    }

    /// The hang report for `r` at `now`, if it is hung (only ranks that speak and run, not
    /// already stopping or reported; `process_state` is read only for those).
    pub(crate) fn judge(
        &self,
        r: &Rank,
        process_state: impl FnOnce() -> Option<char>,
        now: Instant,
    ) -> Option<HangReport> {
        if !r.state.is_running() || r.stopping || !r.speaks || r.hang.is_some() {
            return None;
        }
        let threshold = self.threshold(r, process_state());
        let stalled = now.duration_since(r.last_progress);
        (stalled >= threshold).then(|| HangReport {
            stalled_ms: stalled.as_millis() as u64,
            threshold_ms: threshold.as_millis() as u64,
            phase: r.phase.clone(),
            stack: String::new(),
        })
    }
}

pub(crate) async fn detect(agent: Arc<Agent>) {
    let rule = agent.cfg.hang;
    loop {
        tokio::time::sleep(HANG_CHECK_EVERY).await;
        let now = Instant::now();
        let hung: Vec<(RankKey, u32, HangReport)> = {
            let node = agent.node.lock().expect("agent state");
            node.state
                .ranks
                .iter()
                .filter_map(|(key, r)| {
                    let pid = r.pid?;
                    rule.judge(r, || process_state(pid), now).map(|report| (*key, pid, report))
                })
                .collect()
        };
        for (key, pid, mut report) in hung {
            let kernel = capture_stacks(pid);
            let dump =
                agent.cfg.work_dir.join(format!("jobs/{}/attempt-{}/rank-{}.pystack", key.0, key.1, key.2));
            report.stack = match python_stack(pid, &dump).await {
                Some(python) => {
                    format!("Python stack (faulthandler):\n{python}\nthreads (from /proc):\n{kernel}")
                }
                None => kernel,
            };
            say!(
                "agent {}: job {} rank {} hung ({} ms without progress); killing it",
                agent.cfg.name,
                key.0,
                key.2,
                report.stalled_ms
            );
            if let Some(r) = agent.node.lock().expect("agent state").state.ranks.get_mut(&key) {
                r.hang = Some(report);
            }
            signal_groups(&[pid], libc::SIGKILL);
            agent.metrics.hang_killed();
        }
    }
}

/// How long a Python rank has to write its stack once asked.
const PYTHON_STACK_WAIT: Duration = Duration::from_secs(2);
/// The dump is complete once its file stopped growing this long.
const PYTHON_STACK_SETTLED: Duration = Duration::from_millis(100);

/// Every thread's Python stack of a rank whose sitecustomize armed faulthandler on SIGUSR2 (it
/// opened `dump`; None for other ranks): SIGUSR2, then SIGCONT for a stopped rank (the pending
/// signal runs first, so the dump shows where it stopped), then the bytes the dump appended.
async fn python_stack(pid: u32, dump: &std::path::Path) -> Option<String> {
    const MAX_BYTES: usize = 12 * 1024;
    let before = std::fs::metadata(dump).ok()?.len();
    // SAFETY: kill(2) with a pid the agent launched and has not reaped (it is about to kill it).
    unsafe {
        libc::kill(pid as i32, libc::SIGUSR2);
        libc::kill(pid as i32, libc::SIGCONT);
    }
    let deadline = Instant::now() + PYTHON_STACK_WAIT;
    let (mut last, mut changed) = (before, Instant::now());
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let len = std::fs::metadata(dump).map_or(last, |m| m.len());
        if len != last {
            (last, changed) = (len, Instant::now());
        } else if len > before && changed.elapsed() >= PYTHON_STACK_SETTLED {
            break;
        }
    }
    let bytes = std::fs::read(dump).ok()?;
    let text = String::from_utf8_lossy(bytes.get(before as usize..)?);
    let mut text = text.into_owned();
    if text.is_empty() {
        return None;
    }
    if text.len() > MAX_BYTES {
        let mut cut = MAX_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text += "\n[truncated]\n";
    }
    Some(text)
}

/// The one-letter state of a process (R, S, D, T, t, Z, …) from /proc/PID/stat.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    state_in_stat(&stat)
}

/// The state field of a /proc stat line. The command name is in parentheses and may hold spaces
/// and parentheses itself: the state follows the last ')'.
fn state_in_stat(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Every thread of `pid`: name, state, wait channel and kernel stack (when readable), bounded.
fn capture_stacks(pid: u32) -> String {
    const MAX_BYTES: usize = 16 * 1024;
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("/proc/{pid}/task is not readable");
    };
    let mut tids: Vec<u32> = tasks.flatten().filter_map(|t| t.file_name().to_str()?.parse().ok()).collect();
    tids.sort_unstable();
    for tid in tids {
        let base = format!("/proc/{pid}/task/{tid}");
        let read = |f: &str| std::fs::read_to_string(format!("{base}/{f}")).unwrap_or_default();
        let comm = read("comm");
        let state = state_in_stat(&read("stat")).unwrap_or('?');
        out += &format!("thread {tid} {:?} state {state} wchan {}\n", comm.trim(), read("wchan").trim());
        for line in read("stack").lines().take(12) {
            out += &format!("    {line}\n");
        }
        if out.len() > MAX_BYTES {
            out.truncate(MAX_BYTES);
            out += "\n[truncated]\n";
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::api::{RankState, StepTime};

    const RULE: HangRule =
        HangRule { floor: Duration::from_secs(4), factor: 4.0, startup: Duration::from_secs(60) };

    fn speaking_rank(t0: Instant) -> Rank {
        let mut r = Rank::new(RankState::Running { pid: 7 }, Some(7), t0);
        r.speaks = true;
        r
    }

    #[test]
    fn the_threshold_is_the_floor_or_factor_times_the_median_step_and_startup_before_any() {
        let t0 = Instant::now();
        let mut r = speaking_rank(t0);
        assert_eq!(RULE.threshold(&r, Some('T')), Duration::from_secs(60), "no step yet: startup allowance");
        r.step = Some(1);
        assert_eq!(RULE.threshold(&r, Some('T')), Duration::from_secs(4), "a step but no median: the floor");
        for step in 1..=3 {
            r.steps.push_back(StepTime { step, ms: 2000.0, end_ms: 0 });
        }
        assert_eq!(RULE.threshold(&r, Some('R')), Duration::from_secs(8), "4 × a 2 s median");
        assert_eq!(
            RULE.threshold(&r, Some('S')),
            Duration::from_secs(12),
            "a sleeping rank waits half again"
        );
        assert_eq!(RULE.threshold(&r, None), Duration::from_secs(12));
    }

    #[test]
    fn only_a_speaking_running_rank_past_its_threshold_is_hung() {
        let t0 = Instant::now();
        let mut r = speaking_rank(t0);
        r.step = Some(5);
        r.phase = Some("allreduce".into());
        assert_eq!(RULE.judge(&r, || Some('T'), t0 + Duration::from_millis(3999)), None);
        let report = RULE.judge(&r, || Some('T'), t0 + Duration::from_secs(5)).expect("hung");
        assert_eq!(
            (report.stalled_ms, report.threshold_ms, report.phase.as_deref()),
            (5000, 4000, Some("allreduce"))
        );
        let late = t0 + Duration::from_secs(600);
        r.speaks = false;
        assert_eq!(RULE.judge(&r, || Some('T'), late), None, "a program that never speaks is never hung");
        r.speaks = true;
        r.stopping = true;
        assert_eq!(RULE.judge(&r, || Some('T'), late), None, "a rank being stopped is not hung");
        r.stopping = false;
        r.hang = Some(report);
        assert_eq!(RULE.judge(&r, || Some('T'), late), None, "reported once");
    }

    #[test]
    fn the_state_follows_the_last_parenthesis_of_the_command_name() {
        assert_eq!(state_in_stat("1234 (python3) S 1 2 3"), Some('S'));
        assert_eq!(state_in_stat("1234 (a) b) (c) T 1 2 3"), Some('T'));
        assert_eq!(state_in_stat("garbage"), None);
        // SAFETY: gettid(2) has no preconditions.
        let tid = unsafe { libc::gettid() };
        assert_eq!(process_state(tid as u32), Some('R'), "the thread running this test runs");
    }
}
