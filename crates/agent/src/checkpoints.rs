//! The agent's checkpoint tiers. Rank 0 writes each in-memory checkpoint (DESIGN's directory
//! format: files + `manifest.json` with every file's SHA-256) into this node's memory directory on
//! tmpfs and says so on the progress socket. The leader's agent then copies it to a buddy agent
//! on another node (which keeps it in its own memory directory) and persists every n-th one into
//! the job's checkpoint directory, off the ranks' critical path. On a restart, every node starts
//! from the step the controller names: its own copy, a copy fetched from a holder, or the
//! persisted one, whichever first verifies.

use net::client::{Client, Method};
use proto::api::{CheckpointReport, JobId, RestoreSpec, Tier};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const MANIFEST: &str = "manifest.json";
/// In-memory checkpoints kept per job and node (the newest and the one before, in case the newest
/// turns out corrupt).
pub const KEEP_IN_MEMORY: usize = 2;
/// Largest checkpoint file fetched from another agent.
const MAX_FILE_BYTES: usize = 16 << 30;
/// Deadline for copying one checkpoint file between agents.
const COPY_TIMEOUT: Duration = Duration::from_secs(120);

pub fn step_dir_name(step: u64) -> String {
    format!("step_{step:08}")
}

fn parse_step(name: &str) -> Option<u64> {
    name.strip_prefix("step_")?.parse().ok()
}

/// Complete checkpoint steps under `root` (a directory counts once its manifest is in place).
pub fn steps_in(root: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    let mut steps: Vec<u64> = entries
        .flatten()
        .filter_map(|e| {
            let step = parse_step(e.file_name().to_str()?)?;
            e.path().join(MANIFEST).is_file().then_some(step)
        })
        .collect();
    steps.sort_unstable();
    steps
}

/// What this node reports: its in-memory steps per job, and persisted steps of jobs it leads.
pub fn report(memory_root: &Path, persisted: &[(JobId, PathBuf)]) -> Vec<CheckpointReport> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(memory_root) {
        for e in entries.flatten() {
            let Some(job_id) = e.file_name().to_str().and_then(|n| n.strip_prefix("job-")?.parse().ok())
            else {
                continue;
            };
            out.extend(steps_in(&e.path()).into_iter().map(|step| CheckpointReport {
                job_id,
                step,
                tier: Tier::Memory,
            }));
        }
    }
    for (job_id, dir) in persisted {
        out.extend(steps_in(dir).into_iter().map(|step| CheckpointReport {
            job_id: *job_id,
            step,
            tier: Tier::Persisted,
        }));
    }
    out
}

/// Removes all but the newest `keep` complete checkpoints under `root`, and stale temporaries.
pub fn prune(root: &Path, keep: usize) {
    let steps = steps_in(root);
    for &step in steps.iter().rev().skip(keep) {
        let _ = std::fs::remove_dir_all(root.join(step_dir_name(step)));
    }
}

#[derive(Deserialize)]
struct ManifestFile {
    manifest: ManifestFiles,
}

#[derive(Deserialize)]
struct ManifestFiles {
    step: u64,
    files: Vec<FileEntry>,
}

#[derive(Deserialize)]
struct FileEntry {
    name: String,
    bytes: u64,
    sha256: String,
}

fn read_manifest(dir: &Path) -> Result<ManifestFiles, String> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let m: ManifestFile =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: not a manifest: {e}", path.display()))?;
    for f in &m.manifest.files {
        if !valid_file_name(&f.name) {
            return Err(format!("{}: lists an invalid file name {:?}", path.display(), f.name));
        }
    }
    Ok(m.manifest)
}

/// File names inside a checkpoint directory: no separators, no leading dot.
pub fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Checks every file the manifest lists: size and SHA-256.
pub fn verify(dir: &Path, step: u64) -> Result<(), String> {
    let m = read_manifest(dir)?;
    if m.step != step {
        return Err(format!("{}: manifest is for step {}, expected {step}", dir.display(), m.step));
    }
    for f in &m.files {
        let path = dir.join(&f.name);
        let mut file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(|e| format!("{}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            hasher.update(&buf[..n]);
        }
        let hex: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if total != f.bytes || hex != f.sha256 {
            return Err(format!("{}: size or SHA-256 differs from the manifest", path.display()));
        }
    }
    Ok(())
}

/// The files of a checkpoint, manifest last (a receiver commits the directory on the manifest).
pub fn files_in_order(dir: &Path) -> Result<Vec<String>, String> {
    let m = read_manifest(dir)?;
    Ok(m.files.into_iter().map(|f| f.name).chain(std::iter::once(MANIFEST.to_string())).collect())
}

/// Copies a complete checkpoint directory to `dest_root/step_N` (temporary name, then rename).
pub fn copy_dir(src: &Path, dest_root: &Path, step: u64) -> Result<PathBuf, String> {
    let tmp = dest_root.join(format!(".{}.tmp", step_dir_name(step)));
    let fin = dest_root.join(step_dir_name(step));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    for name in files_in_order(src)? {
        std::fs::copy(src.join(&name), tmp.join(&name))
            .map_err(|e| format!("copying {name} to {}: {e}", tmp.display()))?;
    }
    let _ = std::fs::remove_dir_all(&fin);
    std::fs::rename(&tmp, &fin).map_err(|e| format!("{}: {e}", fin.display()))?;
    Ok(fin)
}

/// Sends a checkpoint to the buddy agent at `buddy`, file by file, manifest last.
pub async fn push(token: &str, buddy: &str, job_id: JobId, step: u64, dir: &Path) -> Result<(), String> {
    let client = Client::new(buddy, token, COPY_TIMEOUT)?;
    for name in files_in_order(dir)? {
        let bytes = tokio::fs::read(dir.join(&name)).await.map_err(|e| format!("{name}: {e}"))?;
        client
            .call(
                Method::PUT,
                &format!("/v1/checkpoints/{job_id}/{step}/{name}"),
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
    let tmp = job_root.join(format!(".{}.fetch", step_dir_name(step)));
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
        match verify(&local, restore.step) {
            Ok(()) => return Ok(local),
            Err(e) => why.push(e),
        }
    }
    for source in &restore.sources {
        match fetch(token, source, job_id, restore.step, job_memory).await {
            Ok(dir) => match verify(&dir, restore.step) {
                Ok(()) => return Ok(dir),
                Err(e) => why.push(e),
            },
            Err(e) => why.push(e),
        }
    }
    if restore.persisted {
        let dir = persisted_root.join(step_dir_name(restore.step));
        match verify(&dir, restore.step) {
            Ok(()) => return Ok(dir),
            Err(e) => why.push(e),
        }
    }
    if why.is_empty() {
        why.push("no node holds it any more".into());
    }
    Err(format!("step {}: {}", restore.step, why.join("; ")))
}
