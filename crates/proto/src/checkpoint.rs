//! The checkpoint directory layout (DESIGN.md), shared by the trainer that writes checkpoints and
//! the agent that copies, persists, prunes and verifies them: one directory `step_NNNNNNNN` per
//! step holding the files and `manifest.json`, which lists every file with its size and SHA-256.
//! A directory is assembled under a hidden temporary name and renamed into place, so one that is
//! named `step_N` and has a manifest is complete. What the files hold is the trainer's business;
//! this module knows only names, the manifest's file list and its step.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";
const STEP_PREFIX: &str = "step_";

pub fn step_dir_name(step: u64) -> String {
    format!("{STEP_PREFIX}{step:08}")
}

/// The step of a directory named by [`step_dir_name`].
pub fn parse_step_dir_name(name: &str) -> Option<u64> {
    name.strip_prefix(STEP_PREFIX)?.parse().ok()
}

/// The hidden name a checkpoint of `step` is assembled under before its rename; `purpose` tells
/// writers apart (`tmp` for a writer, `incoming` for a receiver, `fetch` for a fetcher).
pub fn hidden_dir_name(step: u64, purpose: &str) -> String {
    format!(".{}.{purpose}", step_dir_name(step))
}

/// One file of a checkpoint as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

impl FileEntry {
    pub fn of(name: &str, bytes: &[u8]) -> FileEntry {
        FileEntry { name: name.into(), bytes: bytes.len() as u64, sha256: sha256_hex(bytes) }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// File names inside a checkpoint directory: no separators, no leading dot.
pub fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// What every manifest holds, whoever wrote it: the step and the files. The file on disk is
/// `{"manifest": {...}, "manifest_sha256": ...}`; the trainer's own fields are ignored here.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ManifestHead {
    pub step: u64,
    pub files: Vec<FileEntry>,
    /// The job that wrote it (none for a checkpoint written outside a job).
    #[serde(default)]
    pub job_id: Option<u64>,
}

#[derive(Deserialize)]
struct ManifestFile {
    manifest: ManifestHead,
}

/// Reads `dir`'s manifest: its step and files, every file name checked.
pub fn read_manifest_head(dir: &Path) -> Result<ManifestHead, String> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let m: ManifestFile =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: not a manifest: {e}", path.display()))?;
    if let Some(f) = m.manifest.files.iter().find(|f| !valid_file_name(&f.name)) {
        return Err(format!("{}: lists an invalid file name {:?}", path.display(), f.name));
    }
    Ok(m.manifest)
}

/// The files of a checkpoint, manifest last (a receiver commits the directory on the manifest).
pub fn files_in_order(dir: &Path) -> Result<Vec<String>, String> {
    let m = read_manifest_head(dir)?;
    Ok(m.files.into_iter().map(|f| f.name).chain(std::iter::once(MANIFEST.to_string())).collect())
}

/// Whether `job_id` may restore the checkpoint in `dir`: it wrote it, or no job did.
pub fn belongs_to(dir: &Path, job_id: u64) -> bool {
    read_manifest_head(dir).is_ok_and(|m| m.job_id.is_none_or(|j| j == job_id))
}

/// Checks that `dir` holds step `step` of job `job_id` (or of no job) and every file its manifest
/// lists, size and SHA-256, reading each file once in bounded memory. The error names the file
/// that differs, or the job the checkpoint belongs to.
pub fn verify(dir: &Path, step: u64, job_id: u64) -> Result<(), String> {
    let m = read_manifest_head(dir)?;
    if m.step != step {
        return Err(format!("{}: manifest is for step {}, expected {step}", dir.display(), m.step));
    }
    if let Some(owner) = m.job_id.filter(|&j| j != job_id) {
        return Err(format!("{}: belongs to job {owner}, not job {job_id}", dir.display()));
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
        if total != f.bytes || hex(&hasher.finalize()) != f.sha256 {
            return Err(format!("{}: size or SHA-256 differs from the manifest", path.display()));
        }
    }
    Ok(())
}

/// Complete checkpoint steps under `root`, oldest first (a directory counts once its manifest is
/// in place). A root that does not exist holds none.
pub fn complete_steps(root: &Path) -> std::io::Result<Vec<u64>> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut steps = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Some(step) = entry.file_name().to_str().and_then(parse_step_dir_name) else { continue };
        if entry.path().join(MANIFEST).is_file() {
            steps.push(step);
        }
    }
    steps.sort_unstable();
    Ok(steps)
}

/// The newest complete checkpoint directory under `root` (unverified), if any.
pub fn latest(root: &Path) -> std::io::Result<Option<PathBuf>> {
    Ok(complete_steps(root)?.last().map(|&step| root.join(step_dir_name(step))))
}

/// Removes all but the newest `keep` complete checkpoints under `root`.
pub fn prune(root: &Path, keep: usize) {
    prune_where(root, keep, |_| true);
}

/// [`prune`] of the checkpoints `job_id` may restore alone: a directory another job shares keeps
/// that job's.
pub fn prune_job(root: &Path, keep: usize, job_id: u64) {
    prune_where(root, keep, |dir| belongs_to(dir, job_id));
}

fn prune_where(root: &Path, keep: usize, mine: impl Fn(&Path) -> bool) {
    let steps = complete_steps(root).unwrap_or_default();
    let mine: Vec<u64> = steps.into_iter().filter(|&s| mine(&root.join(step_dir_name(s)))).collect();
    for &step in mine.iter().rev().skip(keep) {
        let _ = std::fs::remove_dir_all(root.join(step_dir_name(step)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_checkpoint(root: &Path, step: u64, files: &[(&str, &[u8])]) -> PathBuf {
        let dir = root.join(step_dir_name(step));
        std::fs::create_dir_all(&dir).unwrap();
        let entries: Vec<FileEntry> = files.iter().map(|(n, b)| FileEntry::of(n, b)).collect();
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        let manifest = serde_json::json!({"manifest": {"step": step, "files": entries, "extra": 1}, "manifest_sha256": "x"});
        std::fs::write(dir.join(MANIFEST), manifest.to_string()).unwrap();
        dir
    }

    fn temp_root(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("myriad-proto-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        root
    }

    #[test]
    fn names_round_trip_and_hidden_names_never_count() {
        assert_eq!(step_dir_name(42), "step_00000042");
        assert_eq!(parse_step_dir_name(&step_dir_name(42)), Some(42));
        assert_eq!(parse_step_dir_name(&hidden_dir_name(42, "tmp")), None);
        assert!(
            valid_file_name("model.safetensors") && !valid_file_name("../x") && !valid_file_name(".hidden")
        );
    }

    #[test]
    fn only_complete_directories_count_and_a_flipped_byte_is_named() {
        let root = temp_root("layout");
        for step in [3, 1, 2] {
            write_checkpoint(
                &root,
                step,
                &[("model.safetensors", b"weights"), ("optimizer.safetensors", b"moments")],
            );
        }
        std::fs::create_dir_all(root.join(step_dir_name(9))).unwrap(); // no manifest: incomplete
        std::fs::create_dir_all(root.join(hidden_dir_name(8, "tmp"))).unwrap();
        assert_eq!(complete_steps(&root).unwrap(), vec![1, 2, 3]);
        assert_eq!(latest(&root).unwrap(), Some(root.join(step_dir_name(3))));
        let dir = root.join(step_dir_name(3));
        verify(&dir, 3, 7).unwrap();
        assert!(verify(&dir, 2, 7).unwrap_err().contains("manifest is for step 3"));
        assert_eq!(files_in_order(&dir).unwrap().last().map(String::as_str), Some(MANIFEST));
        std::fs::write(dir.join("optimizer.safetensors"), b"momentz").unwrap();
        assert!(verify(&dir, 3, 7).unwrap_err().contains("optimizer.safetensors"));
        prune(&root, 2);
        assert_eq!(complete_steps(&root).unwrap(), vec![2, 3]);
        assert_eq!(complete_steps(&root.join("absent")).unwrap(), Vec::<u64>::new());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_job_never_takes_another_jobs_checkpoint() {
        let root = temp_root("owner");
        let dir = write_checkpoint(&root, 5, &[("model.safetensors", b"weights")]);
        let text = std::fs::read_to_string(dir.join(MANIFEST)).unwrap();
        let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(belongs_to(&dir, 1) && belongs_to(&dir, 2), "a checkpoint of no job is anyone's");
        m["manifest"]["job_id"] = 1.into();
        std::fs::write(dir.join(MANIFEST), m.to_string()).unwrap();
        verify(&dir, 5, 1).unwrap();
        assert!(belongs_to(&dir, 1) && !belongs_to(&dir, 2));
        let e = verify(&dir, 5, 2).unwrap_err();
        assert!(e.contains("belongs to job 1, not job 2"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
