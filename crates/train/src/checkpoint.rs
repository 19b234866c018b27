//! Checkpoints as DESIGN.md fixes them: one directory per step holding `model.safetensors`
//! (weights, Hugging Face GPT-2 names), `optimizer.safetensors` (AdamW moments, `exp_avg.<name>`
//! and `exp_avg_sq.<name>`) and `manifest.json` (step, world size, data cursor, RNG state, configs
//! and the SHA-256 of every file, plus a SHA-256 of the manifest's own body).
//!
//! A checkpoint is written under a temporary name and renamed into place, so a directory named
//! `step_N` is always complete; loading verifies every hash before parsing anything, so a flipped
//! or truncated byte is refused with the name of the file it is in.

use crate::config::{ModelConfig, TrainConfig};
use crate::data::DataCursor;
use crate::error::{Error, Result};
use crate::params::{param_specs, TensorSpec};
use crate::safetensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "myriad-checkpoint/1";
pub const MANIFEST: &str = "manifest.json";
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// Optimizer steps completed when this was taken.
    pub step: u64,
    pub world_size: usize,
    pub data_cursor: DataCursor,
    /// State of the trainer's own RNG (reserved for stochastic layers; restored as is).
    pub rng_state: u64,
    /// AdamW's update count (bias correction).
    pub adam_t: u64,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub files: Vec<FileEntry>,
}

/// The file as stored: the manifest and the SHA-256 of its compact JSON serialisation, so a
/// corrupted manifest is caught like any other file.
#[derive(Serialize, Deserialize)]
struct ManifestFile {
    manifest: Manifest,
    manifest_sha256: String,
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a checkpoint holds, borrowed from the live trainer.
pub struct Snapshot<'a> {
    pub step: u64,
    pub data_cursor: DataCursor,
    pub rng_state: u64,
    pub adam_t: u64,
    pub model: &'a ModelConfig,
    pub train: &'a TrainConfig,
    pub params: &'a [f32],
    pub exp_avg: &'a [f32],
    pub exp_avg_sq: &'a [f32],
}

pub struct Loaded {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub params: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

pub fn step_dir_name(step: u64) -> String {
    format!("step_{step:08}")
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Writes `snap` as `root/step_N` and returns that path. An existing `step_N` is replaced only
/// once the new one is complete.
pub fn save(root: &Path, snap: &Snapshot) -> Result<PathBuf> {
    let specs = param_specs(snap.model);
    assert_eq!(snap.params.len(), specs.iter().map(TensorSpec::numel).sum::<usize>());
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let final_dir = root.join(step_dir_name(snap.step));
    let tmp_dir = root.join(format!(".{}.tmp-{}", step_dir_name(snap.step), std::process::id()));
    if tmp_dir.exists() {
        std::fs::remove_dir_all(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
    }
    std::fs::create_dir(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;

    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let weights: Vec<(&str, &[usize], &[f32])> =
        specs.iter().map(|s| (s.name.as_str(), s.shape.as_slice(), &snap.params[s.range()])).collect();
    let moment_names: Vec<(String, String)> =
        specs.iter().map(|s| (format!("exp_avg.{}", s.name), format!("exp_avg_sq.{}", s.name))).collect();
    let mut moments: Vec<(&str, &[usize], &[f32])> = Vec::with_capacity(2 * specs.len());
    for (s, (m_name, v_name)) in specs.iter().zip(&moment_names) {
        moments.push((m_name, &s.shape, &snap.exp_avg[s.range()]));
        moments.push((v_name, &s.shape, &snap.exp_avg_sq[s.range()]));
    }
    let mut files = Vec::new();
    for (name, tensors) in [(MODEL_FILE, weights), (OPTIMIZER_FILE, moments)] {
        let bytes = safetensors::serialize(&tensors, &meta);
        write_synced(&tmp_dir.join(name), &bytes)?;
        files.push(FileEntry { name: name.into(), bytes: bytes.len() as u64, sha256: sha256_hex(&bytes) });
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        step: snap.step,
        world_size: 1,
        data_cursor: snap.data_cursor.clone(),
        rng_state: snap.rng_state,
        adam_t: snap.adam_t,
        model: snap.model.clone(),
        train: snap.train.clone(),
        files,
    };
    let body = serde_json::to_vec(&manifest).expect("manifest serialises");
    let file = ManifestFile { manifest_sha256: sha256_hex(&body), manifest };
    let text = serde_json::to_vec_pretty(&file).expect("manifest serialises");
    write_synced(&tmp_dir.join(MANIFEST), &text)?;

    if final_dir.exists() {
        let old = root.join(format!(".{}.old-{}", step_dir_name(snap.step), std::process::id()));
        std::fs::rename(&final_dir, &old).map_err(|e| Error::io(&final_dir, e))?;
        std::fs::rename(&tmp_dir, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(&tmp_dir, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(root) {
        let _ = d.sync_all();
    }
    Ok(final_dir)
}

/// Reads and verifies the manifest of checkpoint directory `dir`.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Error::checkpoint(&path, "does not exist (not a complete checkpoint)")
        }
        _ => Error::io(&path, e),
    })?;
    let file: ManifestFile = serde_json::from_slice(&text)
        .map_err(|e| Error::checkpoint(&path, format!("is not a valid manifest: {e}")))?;
    let body = serde_json::to_vec(&file.manifest).expect("manifest serialises");
    if sha256_hex(&body) != file.manifest_sha256 {
        return Err(Error::checkpoint(&path, "is corrupt: its contents do not match manifest_sha256"));
    }
    if file.manifest.format != FORMAT {
        return Err(Error::checkpoint(
            &path,
            format!("has format {:?}, expected {FORMAT:?}", file.manifest.format),
        ));
    }
    file.manifest.model.validate()?;
    Ok(file.manifest)
}

/// Loads and fully verifies checkpoint directory `dir`: manifest hash, every file's size and
/// SHA-256, then every tensor's name and shape against the manifest's model config.
pub fn load(dir: &Path) -> Result<Loaded> {
    let manifest = read_manifest(dir)?;
    let specs = param_specs(&manifest.model);
    let mut contents = BTreeMap::new();
    for entry in &manifest.files {
        let path = dir.join(&entry.name);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        if bytes.len() as u64 != entry.bytes {
            return Err(Error::checkpoint(
                &path,
                format!("is {} bytes, the manifest says {} (truncated?)", bytes.len(), entry.bytes),
            ));
        }
        if sha256_hex(&bytes) != entry.sha256 {
            return Err(Error::checkpoint(&path, "is corrupt: SHA-256 does not match the manifest"));
        }
        contents.insert(entry.name.clone(), (path, bytes));
    }
    let take = |name: &str, prefix: &str| -> Result<Vec<f32>> {
        let (path, bytes) = contents
            .get(name)
            .ok_or_else(|| Error::checkpoint(dir.join(MANIFEST), format!("does not list {name}")))?;
        let tensors = safetensors::deserialize(bytes, path)?;
        let n: usize = specs.iter().map(TensorSpec::numel).sum();
        let mut flat = vec![0f32; n];
        for s in &specs {
            let key = format!("{prefix}{}", s.name);
            let t =
                tensors.get(&key).ok_or_else(|| Error::checkpoint(path, format!("has no tensor {key}")))?;
            if t.shape != s.shape {
                return Err(Error::checkpoint(
                    path,
                    format!("tensor {key} has shape {:?}, expected {:?}", t.shape, s.shape),
                ));
            }
            flat[s.range()].copy_from_slice(&t.data);
        }
        Ok(flat)
    };
    let params = take(MODEL_FILE, "")?;
    let exp_avg = take(OPTIMIZER_FILE, "exp_avg.")?;
    let exp_avg_sq = take(OPTIMIZER_FILE, "exp_avg_sq.")?;
    Ok(Loaded { dir: dir.to_path_buf(), manifest, params, exp_avg, exp_avg_sq })
}

/// The newest `step_N` directory under `root` that has a manifest (unverified), if any.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(root, e)),
    };
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(root, e))?;
        let name = entry.file_name();
        let Some(step) =
            name.to_str().and_then(|n| n.strip_prefix("step_")).and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(MANIFEST).is_file() && best.as_ref().is_none_or(|(s, _)| step > *s) {
            best = Some((step, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}
