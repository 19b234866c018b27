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
use proto::checkpoint::{self as layout, sha256_hex};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "myriad-checkpoint/1";
pub use proto::checkpoint::{step_dir_name, FileEntry, MANIFEST};
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

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
    /// Ranks whose ZeRO-1 optimizer shards make up `optimizer.rank{R}.safetensors`; 0 when the
    /// whole optimizer state is in `optimizer.safetensors`.
    #[serde(default)]
    pub optimizer_shards: usize,
    pub files: Vec<FileEntry>,
    /// The job that wrote it, when a rank under an agent did: no other job restores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<u64>,
}

/// The file as stored: the manifest and the SHA-256 of its compact JSON serialisation, so a
/// corrupted manifest is caught like any other file.
#[derive(Serialize, Deserialize)]
struct ManifestFile {
    manifest: Manifest,
    manifest_sha256: String,
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
    /// AdamW moments of the parameters in `shard.range` (all of them when unsharded).
    pub exp_avg: &'a [f32],
    pub exp_avg_sq: &'a [f32],
    pub world_size: usize,
    pub shard: Option<Shard>,
    pub job_id: Option<u64>,
}

/// One rank's ZeRO-1 slice of the optimizer state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
    pub range: std::ops::Range<usize>,
}

pub struct Loaded {
    pub manifest: Manifest,
    pub params: Vec<f32>,
    /// Moments of the parameters in `moments_range`.
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    pub moments_range: std::ops::Range<usize>,
}

pub fn shard_file_name(rank: usize) -> String {
    format!("optimizer.rank{rank}.safetensors")
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Writes `snap` as `root/step_N` and returns that path (a single writer: one process, or the
/// rank that speaks for a data-parallel group whose ranks all hold the same state).
pub fn save(root: &Path, snap: &Snapshot) -> Result<PathBuf> {
    let tmp = prepare(root, snap.step)?;
    let files = write_parts(&tmp, snap, true)?;
    commit(root, &tmp, snap, files)
}

/// The temporary directory a checkpoint of `step` is assembled in; shared by the ranks of a
/// sharded save (one rank prepares it, then all write into it).
pub fn temp_dir(root: &Path, step: u64) -> PathBuf {
    root.join(layout::hidden_dir_name(step, "tmp"))
}

/// Creates an empty temporary directory for `step`, removing a stale one from a failed attempt.
pub fn prepare(root: &Path, step: u64) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let tmp_dir = temp_dir(root, step);
    if tmp_dir.exists() {
        std::fs::remove_dir_all(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
    }
    std::fs::create_dir(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
    Ok(tmp_dir)
}

/// Writes this process's files into `tmp_dir`: the weights when `with_model`, and its optimizer
/// state (whole, or its ZeRO-1 shard as flat tensors `exp_avg`, `exp_avg_sq`).
pub fn write_parts(tmp_dir: &Path, snap: &Snapshot, with_model: bool) -> Result<Vec<FileEntry>> {
    let specs = param_specs(snap.model);
    assert_eq!(snap.params.len(), specs.iter().map(TensorSpec::numel).sum::<usize>());
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut files = Vec::new();
    let mut write = |name: &str, tensors: &[(&str, &[usize], &[f32])], meta: &BTreeMap<String, String>| {
        let bytes = safetensors::serialize(tensors, meta);
        write_synced(&tmp_dir.join(name), &bytes)?;
        files.push(FileEntry::of(name, &bytes));
        Ok::<(), Error>(())
    };
    if with_model {
        let weights: Vec<(&str, &[usize], &[f32])> =
            specs.iter().map(|s| (s.name.as_str(), s.shape.as_slice(), &snap.params[s.range()])).collect();
        write(MODEL_FILE, &weights, &meta)?;
    }
    match &snap.shard {
        None => {
            let names: Vec<(String, String)> = specs
                .iter()
                .map(|s| (format!("exp_avg.{}", s.name), format!("exp_avg_sq.{}", s.name)))
                .collect();
            let mut moments: Vec<(&str, &[usize], &[f32])> = Vec::with_capacity(2 * specs.len());
            for (s, (m_name, v_name)) in specs.iter().zip(&names) {
                moments.push((m_name, &s.shape, &snap.exp_avg[s.range()]));
                moments.push((v_name, &s.shape, &snap.exp_avg_sq[s.range()]));
            }
            write(OPTIMIZER_FILE, &moments, &meta)?;
        }
        Some(shard) => {
            let len = [shard.range.len()];
            let mut meta = meta.clone();
            meta.insert("shard_start".into(), shard.range.start.to_string());
            meta.insert("shard_rank".into(), shard.rank.to_string());
            let tensors: [(&str, &[usize], &[f32]); 2] =
                [("exp_avg", &len, snap.exp_avg), ("exp_avg_sq", &len, snap.exp_avg_sq)];
            write(&shard_file_name(shard.rank), &tensors, &meta)?;
        }
    }
    Ok(files)
}

/// Writes the manifest listing `files` (every rank's) and renames `tmp_dir` to `root/step_N`.
/// An existing `step_N` is replaced only once the new one is complete.
pub fn commit(root: &Path, tmp_dir: &Path, snap: &Snapshot, files: Vec<FileEntry>) -> Result<PathBuf> {
    let manifest = Manifest {
        format: FORMAT.into(),
        step: snap.step,
        world_size: snap.world_size,
        data_cursor: snap.data_cursor.clone(),
        rng_state: snap.rng_state,
        adam_t: snap.adam_t,
        model: snap.model.clone(),
        train: snap.train.clone(),
        optimizer_shards: snap.shard.as_ref().map_or(0, |s| s.world),
        files,
        job_id: snap.job_id,
    };
    let body = serde_json::to_vec(&manifest).expect("manifest serialises");
    let file = ManifestFile { manifest_sha256: sha256_hex(&body), manifest };
    let text = serde_json::to_vec_pretty(&file).expect("manifest serialises");
    write_synced(&tmp_dir.join(MANIFEST), &text)?;

    let final_dir = root.join(step_dir_name(snap.step));
    if final_dir.exists() {
        let old = root.join(layout::hidden_dir_name(snap.step, "old"));
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        std::fs::rename(&final_dir, &old).map_err(|e| Error::io(&final_dir, e))?;
        std::fs::rename(tmp_dir, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(tmp_dir, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
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

/// Loads and fully verifies an unsharded checkpoint directory `dir`: manifest hash, every
/// file's size and SHA-256, then every tensor's name and shape against the manifest's config.
pub fn load(dir: &Path) -> Result<Loaded> {
    load_for_rank(dir, 0, 1)
}

/// Loads what rank `rank` of `world` needs: the weights and either the whole optimizer state or,
/// for a ZeRO-1 checkpoint (which must have been written by `world` ranks), this rank's shard.
/// Only the files read are verified; each rank verifies its own shard.
pub fn load_for_rank(dir: &Path, rank: usize, world: usize) -> Result<Loaded> {
    let manifest = read_manifest(dir)?;
    let manifest_path = dir.join(MANIFEST);
    let shards = manifest.optimizer_shards;
    if shards > 0 && shards != world {
        return Err(Error::checkpoint(
            &manifest_path,
            format!(
                "holds optimizer shards of {shards} ranks; resume it with WORLD_SIZE={shards} (not {world})"
            ),
        ));
    }
    let verified = |name: &str| -> Result<(PathBuf, Vec<u8>)> {
        let entry = manifest
            .files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| Error::checkpoint(&manifest_path, format!("does not list {name}")))?;
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
        Ok((path, bytes))
    };
    let specs = param_specs(&manifest.model);
    let n: usize = specs.iter().map(TensorSpec::numel).sum();
    let unflatten = |path: &Path, bytes: &[u8], prefix: &str| -> Result<Vec<f32>> {
        let tensors = safetensors::deserialize(bytes, path)?;
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
    let (model_path, model_bytes) = verified(MODEL_FILE)?;
    let params = unflatten(&model_path, &model_bytes, "")?;
    if shards == 0 {
        let (path, bytes) = verified(OPTIMIZER_FILE)?;
        let exp_avg = unflatten(&path, &bytes, "exp_avg.")?;
        let exp_avg_sq = unflatten(&path, &bytes, "exp_avg_sq.")?;
        return Ok(Loaded { manifest, params, exp_avg, exp_avg_sq, moments_range: 0..n });
    }
    let (path, bytes) = verified(&shard_file_name(rank))?;
    let range = comm::segment(n, world, rank);
    let mut tensors = safetensors::deserialize(&bytes, &path)?;
    let mut take = |name: &str| -> Result<Vec<f32>> {
        let t =
            tensors.remove(name).ok_or_else(|| Error::checkpoint(&path, format!("has no tensor {name}")))?;
        if t.shape != [range.len()] {
            return Err(Error::checkpoint(
                &path,
                format!("tensor {name} has shape {:?}, rank {rank}'s shard is [{}]", t.shape, range.len()),
            ));
        }
        Ok(t.data)
    };
    let (exp_avg, exp_avg_sq) = (take("exp_avg")?, take("exp_avg_sq")?);
    Ok(Loaded { manifest, params, exp_avg, exp_avg_sq, moments_range: range })
}

/// The newest `step_N` directory under `root` that has a manifest (unverified), if any.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    layout::latest(root).map_err(|e| Error::io(root, e))
}
