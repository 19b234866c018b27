//! The agent's checkpoint tiers. Rank 0 writes each in-memory checkpoint (DESIGN's directory
//! format: files + `manifest.json` with every file's SHA-256) into this node's memory directory on
//! tmpfs and says so on the progress socket. The leader's agent then copies it to a buddy agent
//! on another node (which keeps it in its own memory directory) and persists every n-th one into
//! the job's checkpoint directory, off the ranks' critical path. On a restart, every node starts
//! from the step the controller names: its own copy, a copy fetched from a holder, or the
//! persisted one, whichever first verifies.

use net::client::{Client, Method};
use proto::api::{CheckpointReport, JobId, RestoreSpec, Tier};
use proto::checkpoint::{
    belongs_to, complete_steps, files_in_order, hidden_dir_name, prune_job, step_dir_name, verify, MANIFEST,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{metrics, Agent};

/// In-memory checkpoints kept per job and node (the newest and the one before, in case the newest
/// turns out corrupt).
pub const KEEP_IN_MEMORY: usize = 2;
/// Largest checkpoint file fetched from another agent.
const MAX_FILE_BYTES: usize = 16 << 30;
/// Deadline for copying one checkpoint file between agents.
const COPY_TIMEOUT: Duration = Duration::from_secs(120);

/// What this node reports: its in-memory steps per job, and persisted steps of jobs it leads.
pub fn report(memory_root: &Path, persisted: &[(JobId, PathBuf)]) -> Vec<CheckpointReport> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(memory_root) {
        for e in entries.flatten() {
            let Some(job_id) = crate::memory_job(&e.file_name()) else { continue };
            out.extend(
                complete_steps(&e.path()).unwrap_or_default().into_iter().map(|step| CheckpointReport {
                    job_id,
                    step,
                    tier: Tier::Memory,
                }),
            );
        }
    }
    // A persisted directory may be shared with another job (two specs naming the same
    // checkpoint_dir): only the steps this job wrote are its.
    for (job_id, dir) in persisted {
        let steps = complete_steps(dir).unwrap_or_default().into_iter();
        out.extend(
            steps
                .filter(|&step| belongs_to(&dir.join(step_dir_name(step)), *job_id))
                .map(|step| CheckpointReport { job_id: *job_id, step, tier: Tier::Persisted }),
        );
    }
    out
}

/// Copies a complete checkpoint directory to `dest_root/step_N` (temporary name, then rename).
pub fn copy_dir(src: &Path, dest_root: &Path, step: u64, job_id: JobId) -> Result<PathBuf, String> {
    let tmp = dest_root.join(hidden_dir_name(step, "tmp"));
    let fin = dest_root.join(step_dir_name(step));
    // A directory shared with another job keeps that job's steps: this one does not overwrite them.
    if fin.join(MANIFEST).is_file() && !belongs_to(&fin, job_id) {
        return Err(format!("{} belongs to another job: not overwritten", fin.display()));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    for name in files_in_order(src)? {
        std::fs::copy(src.join(&name), tmp.join(&name))
            .and_then(|_| sync(&tmp.join(&name)))
            .map_err(|e| format!("copying {name} to {}: {e}", tmp.display()))?;
    }
    // The persisted tier is the one that must survive a power cut: the files, then the directory
    // holding them, then the rename, each on disk before the copy counts (and is reported).
    sync(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let _ = std::fs::remove_dir_all(&fin);
    std::fs::rename(&tmp, &fin).map_err(|e| format!("{}: {e}", fin.display()))?;
    sync(dest_root).map_err(|e| format!("{}: {e}", dest_root.display()))?;
    Ok(fin)
}

/// fsync of a file or a directory.
fn sync(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Sends a checkpoint of `attempt` to the buddy agent at `buddy`, file by file, manifest last (a
/// buddy that has launched a newer attempt of the job refuses it).
pub async fn push(
    token: &str,
    buddy: &str,
    job_id: JobId,
    attempt: u32,
    step: u64,
    dir: &Path,
) -> Result<(), String> {
    let client = Client::new(buddy, token, COPY_TIMEOUT)?;
    for name in files_in_order(dir)? {
        let bytes = tokio::fs::read(dir.join(&name)).await.map_err(|e| format!("{name}: {e}"))?;
        client
            .call(
                Method::PUT,
                &format!("/v1/checkpoints/{job_id}/{step}/{name}?attempt={attempt}"),
                Some((bytes, "application/octet-stream")),
            )
            .await
            .map_err(|e| format!("sending {name} to {buddy}: {e}"))?;
    }
    Ok(())
}

/// Fetches a checkpoint from a holder into `job_root/step_N`.
async fn fetch(
    token: &str,
    source: &str,
    job_id: JobId,
    step: u64,
    job_root: &Path,
) -> Result<PathBuf, String> {
    let client = Client::new(source, token, COPY_TIMEOUT)?.with_response_limit(MAX_FILE_BYTES);
    let tmp = job_root.join(hidden_dir_name(step, "fetch"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let get = |name: String| {
        let client = client.clone();
        async move { client.call(Method::GET, &format!("/v1/checkpoints/{job_id}/{step}/{name}"), None).await }
    };
    let manifest = get(MANIFEST.into()).await.map_err(|e| format!("{source}: {e}"))?;
    std::fs::write(tmp.join(MANIFEST), &manifest).map_err(|e| e.to_string())?;
    for name in files_in_order(&tmp)?.into_iter().filter(|n| n != MANIFEST) {
        let bytes = get(name.clone()).await.map_err(|e| format!("{source}: {name}: {e}"))?;
        std::fs::write(tmp.join(&name), &bytes).map_err(|e| e.to_string())?;
    }
    let fin = job_root.join(step_dir_name(step));
    let _ = std::fs::remove_dir_all(&fin);
    std::fs::rename(&tmp, &fin).map_err(|e| e.to_string())?;
    Ok(fin)
}

/// Finds a verified copy of the step the controller chose: this node's own, a holder's, or the
/// persisted one. Err lists why each failed; the step is then reported bad.
pub async fn resolve_restore(
    token: &str,
    job_id: JobId,
    restore: &RestoreSpec,
    job_memory: &Path,
    persisted_root: &Path,
) -> Result<PathBuf, String> {
    let mut why = Vec::new();
    let local = job_memory.join(step_dir_name(restore.step));
    if local.join(MANIFEST).is_file() {
        match verify(&local, restore.step, job_id) {
            Ok(()) => return Ok(local),
            Err(e) => why.push(e),
        }
    }
    for source in &restore.sources {
        match fetch(token, source, job_id, restore.step, job_memory).await {
            Ok(dir) => match verify(&dir, restore.step, job_id) {
                Ok(()) => return Ok(dir),
                Err(e) => why.push(e),
            },
            Err(e) => why.push(e),
        }
    }
    if restore.persisted {
        let dir = persisted_root.join(step_dir_name(restore.step));
        match verify(&dir, restore.step, job_id) {
            Ok(()) => return Ok(dir),
            Err(e) => why.push(e),
        }
    }
    if why.is_empty() {
        why.push("no node holds it any more".into());
    }
    Err(format!("step {}: {}", restore.step, why.join("; ")))
}

impl Agent {
    /// Rank 0 finished an in-memory checkpoint: copy it to the buddy and maybe persist it, one
    /// copy at a time per job (a newer checkpoint that arrives meanwhile is copied next; older
    /// ones in between are skipped).
    pub(crate) fn checkpoint_taken(self: &Arc<Self>, job_id: JobId, attempt: u32, step: u64) {
        {
            let mut node = self.node.lock().expect("agent state");
            let Some(leader) = node.leading.get_mut(&job_id) else { return };
            // A superseded attempt's rank (still running while it is stopped or fenced) copies
            // nothing: its step may be of a timeline the job has left.
            if leader.attempt != attempt {
                say!(
                    "agent {}: job {job_id}: not copying step {step} of attempt {attempt} (attempt {} leads)",
                    self.cfg.name,
                    leader.attempt
                );
                return;
            }
            if leader.busy {
                leader.pending = Some(step);
                return;
            }
            leader.busy = true;
        }
        let agent = self.clone();
        tokio::spawn(async move {
            let mut step = step;
            loop {
                agent.replicate(job_id, step).await;
                let mut node = agent.node.lock().expect("agent state");
                let Some(leader) = node.leading.get_mut(&job_id) else { return };
                match leader.pending.take() {
                    Some(next) => step = next,
                    None => {
                        leader.busy = false;
                        return;
                    }
                }
            }
        });
    }

    async fn replicate(&self, job_id: JobId, step: u64) {
        let (buddy, persist_dir, persist, attempt) = {
            let node = self.node.lock().expect("agent state");
            let Some(l) = node.leading.get(&job_id) else { return };
            let nth = step / l.checkpoint_every;
            (l.buddy.clone(), l.persist_dir.clone(), nth.is_multiple_of(l.persist_every), l.attempt)
        };
        let dir = self.job_memory(job_id).join(step_dir_name(step));
        let bytes = metrics::dir_bytes(&dir);
        if let Some(buddy) = buddy {
            let started = Instant::now();
            match push(&self.cfg.token, &buddy, job_id, attempt, step, &dir).await {
                Ok(()) => self.metrics.checkpoint_copied("buddy", started.elapsed().as_secs_f64(), bytes),
                Err(e) => {
                    say!("agent {}: job {job_id}: buddy copy of step {step} failed: {e}", self.cfg.name)
                }
            }
        }
        if persist {
            let started = Instant::now();
            let copy = tokio::task::spawn_blocking(move || {
                let result = copy_dir(&dir, &persist_dir, step, job_id);
                prune_job(&persist_dir, PERSISTED_KEEP, job_id);
                result
            });
            match copy.await {
                Ok(Ok(_)) => {
                    self.metrics.checkpoint_copied("persisted", started.elapsed().as_secs_f64(), bytes)
                }
                Ok(Err(e)) => {
                    say!("agent {}: job {job_id}: persisting step {step} failed: {e}", self.cfg.name)
                }
                Err(_) => {}
            }
        }
    }
}

/// Persisted checkpoints kept per job.
const PERSISTED_KEEP: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint directory of `step` written by `job` (or by no job).
    fn checkpoint(root: &Path, step: u64, job: Option<u64>) {
        let dir = root.join(step_dir_name(step));
        std::fs::create_dir_all(&dir).unwrap();
        let manifest = serde_json::json!({"manifest": {"step": step, "files": [], "job_id": job}});
        std::fs::write(dir.join(MANIFEST), manifest.to_string()).unwrap();
    }

    #[test]
    fn a_shared_persisted_directory_reports_only_the_jobs_own_steps() {
        let root = std::env::temp_dir().join(format!("myriad-agent-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (memory, shared) = (root.join("memory"), root.join("shared"));
        checkpoint(&memory.join("job-1"), 5, Some(1));
        checkpoint(&shared, 4, None);
        checkpoint(&shared, 6, Some(1));
        checkpoint(&shared, 7, Some(2));
        let reported = report(&memory, &[(1, shared.clone())]);
        let steps = |tier: Tier| -> Vec<u64> {
            reported.iter().filter(|c| c.tier == tier && c.job_id == 1).map(|c| c.step).collect()
        };
        assert_eq!(steps(Tier::Memory), vec![5]);
        assert_eq!(steps(Tier::Persisted), vec![4, 6], "job 2's step 7 is not job 1's");
        assert!(verify(&shared.join(step_dir_name(7)), 7, 1).unwrap_err().contains("belongs to job 2"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
