//! Job specifications: what a user submits (TOML file or JSON), and the checks that turn a bad one
//! into an error naming the field, before anything is queued.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

const MAX_NAME_LEN: usize = 64;
const MAX_ARGV: usize = 4096;
/// Per argument or variable value, in characters (as the API document's maxLength counts).
const MAX_ARG_CHARS: usize = 64 * 1024;
const MAX_ENV: usize = 1024;
const MAX_PATH_BYTES: usize = 4096;
/// Generous ceilings that stop a typo (`nodes = 1e9`) before it reaches the scheduler.
pub const MAX_NODES: u32 = 100_000;
pub const MAX_RANKS_PER_NODE: u32 = 1024;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    /// Program and arguments of every rank, run directly (never through a shell).
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Nodes the job spans (torchrun's --nnodes).
    #[serde(default = "one")]
    pub nodes: u32,
    /// Ranks on each node (torchrun's --nproc-per-node).
    #[serde(default = "one")]
    pub ranks_per_node: u32,
    /// Hot spare nodes the job may be placed on when regular nodes do not suffice.
    #[serde(default)]
    pub spares: u32,
    /// Restarts of the whole job after a rank or node fails (torchrun's --max-restarts).
    #[serde(default)]
    pub max_restarts: u32,
    /// Relative to each agent's checkpoint root; defaults to `job-<id>`.
    #[serde(default)]
    pub checkpoint_dir: Option<String>,
    /// Absolute working directory of the ranks; defaults to the agent's own.
    #[serde(default)]
    pub workdir: Option<String>,
    /// TORCHELASTIC_RUN_ID (torchrun's --rdzv-id); defaults to `myriad-<id>`.
    #[serde(default)]
    pub run_id: Option<String>,
    /// Steps between the checkpoint directories a rank hands its agent for the buddy copy and
    /// persistence (MYRIAD_CHECKPOINT_EVERY for ranks that take them). The reference trainer
    /// also keeps its state live in the agent's memory every step, which is what restarts use,
    /// so a directory (SHA-256 of every file, a copy over the network) is not needed every step.
    #[serde(default = "fifty")]
    pub checkpoint_every: u64,
    /// Every this many in-memory checkpoints, one is persisted to the checkpoint directory.
    #[serde(default = "ten")]
    pub persist_every: u64,
}

fn fifty() -> u64 {
    50
}

fn ten() -> u64 {
    10
}

fn one() -> u32 {
    1
}

/// A rejected job spec: the field at fault and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for SpecError {}

fn err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError { field: field.into(), message: message.into() }
}

impl JobSpec {
    /// Parses a TOML job file; unknown fields and wrong types are errors naming the field.
    pub fn from_toml(text: &str) -> Result<JobSpec, SpecError> {
        let spec: JobSpec = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().replace('\n', " ");
            let offset = e.span().map(|span| span.start);
            let field = field_in_message(&message)
                .or_else(|| offset.and_then(|at| key_on_line(text, at)))
                .unwrap_or_else(|| "job".into());
            let line = offset.map(|at| text[..at.min(text.len())].matches('\n').count() + 1);
            let place = line.map(|l| format!(" (line {l})")).unwrap_or_default();
            err(field, format!("invalid TOML{place}: {message}"))
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses a JSON job body, with the same rules as [`JobSpec::from_toml`].
    pub fn from_json(bytes: &[u8]) -> Result<JobSpec, SpecError> {
        let spec: JobSpec = crate::api::from_json(bytes).map_err(|e| {
            let message = e.to_string();
            let field = field_in_message(&message).unwrap_or_else(|| "job".into());
            err(field, format!("invalid JSON: {message}"))
        })?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn world_size(&self) -> u32 {
        self.nodes * self.ranks_per_node
    }

    /// Checks every field on its own; whether the cluster can hold the job is the core's question.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_name("name", &self.name)?;
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(err("argv", "must name a program to run"));
        }
        if self.argv.len() > MAX_ARGV {
            return Err(err("argv", format!("has {} entries, at most {MAX_ARGV} allowed", self.argv.len())));
        }
        for (i, arg) in self.argv.iter().enumerate() {
            if arg.chars().count() > MAX_ARG_CHARS || arg.contains('\0') {
                return Err(err(
                    format!("argv[{i}]"),
                    "is longer than 65,536 characters or contains a NUL byte",
                ));
            }
        }
        if self.env.len() > MAX_ENV {
            return Err(err("env", format!("has {} variables, at most {MAX_ENV} allowed", self.env.len())));
        }
        for (key, value) in &self.env {
            let field = format!("env.{key}");
            let valid = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(err(field, "is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"));
            }
            if crate::env::RESERVED.contains(&key.as_str()) {
                return Err(err(field, "is set by Myriad for every rank and cannot be overridden"));
            }
            if value.chars().count() > MAX_ARG_CHARS || value.contains('\0') {
                return Err(err(field, "is longer than 65,536 characters or contains a NUL byte"));
            }
        }
        if self.nodes == 0 {
            return Err(err("nodes", "must be at least 1"));
        }
        if self.nodes > MAX_NODES {
            return Err(err("nodes", format!("{} exceeds the limit of {MAX_NODES}", self.nodes)));
        }
        if self.ranks_per_node == 0 {
            return Err(err("ranks_per_node", "must be at least 1 (a job with zero ranks would never run)"));
        }
        if self.ranks_per_node > MAX_RANKS_PER_NODE {
            return Err(err(
                "ranks_per_node",
                format!("{} exceeds the limit of {MAX_RANKS_PER_NODE}", self.ranks_per_node),
            ));
        }
        if self.checkpoint_every == 0 {
            return Err(err("checkpoint_every", "must be at least 1 step"));
        }
        if self.persist_every == 0 {
            return Err(err("persist_every", "must be at least 1 (every in-memory checkpoint)"));
        }
        if let Some(dir) = &self.checkpoint_dir {
            validate_relative_path("checkpoint_dir", dir)?;
        }
        if let Some(dir) = &self.workdir {
            validate_absolute_path("workdir", dir)?;
        }
        if let Some(id) = &self.run_id {
            validate_name("run_id", id)?;
        }
        Ok(())
    }
}

/// serde names the offending field in backticks ("unknown field `foo`", "missing field `argv`").
fn field_in_message(message: &str) -> Option<String> {
    if !message.starts_with("unknown field") && !message.starts_with("missing field") {
        return None;
    }
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string())
}

/// The key whose assignment holds byte `offset` of a TOML text: the nearest `key = …` line at or
/// before it (`nodes = "two"` → `nodes`; an unclosed `argv = [` → `argv`).
fn key_on_line(text: &str, offset: usize) -> Option<String> {
    let end = text[offset.min(text.len())..].find('\n').map_or(text.len(), |i| offset + i);
    text.get(..end)?.lines().rev().find_map(|line| {
        let (key, _) = line.split_once('=')?;
        let key = key.trim();
        let plain = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        plain.then(|| key.to_string())
    })
}

/// Names become file names and URL segments: letters, digits, `.`, `_`, `-`, not starting with `.`.
pub fn validate_name(field: &str, name: &str) -> Result<(), SpecError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(err(field, format!("must be 1 to {MAX_NAME_LEN} characters")));
    }
    if name.starts_with('.') || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return Err(err(
            field,
            format!("{name:?} may hold only letters, digits, '.', '_' and '-', not starting with '.'"),
        ));
    }
    Ok(())
}

/// A path under some root: relative, without `..`, so it cannot escape the root.
pub fn validate_relative_path(field: &str, path: &str) -> Result<(), SpecError> {
    if path.is_empty() || path.len() > MAX_PATH_BYTES || path.contains('\0') {
        return Err(err(field, "must be a non-empty path without NUL bytes"));
    }
    if path.starts_with('/') {
        return Err(err(field, format!("{path:?} must be relative to the checkpoint root")));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(err(field, format!("{path:?} must not contain '..' (path traversal)")));
    }
    Ok(())
}

fn validate_absolute_path(field: &str, path: &str) -> Result<(), SpecError> {
    if !path.starts_with('/') || path.len() > MAX_PATH_BYTES || path.contains('\0') {
        return Err(err(field, format!("{path:?} must be an absolute path")));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(err(field, format!("{path:?} must not contain '..' (path traversal)")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "gpt-small"
argv = ["myriad", "train", "--preset", "tiny"]
nodes = 2
ranks_per_node = 2
max_restarts = 3
checkpoint_dir = "runs/small"
env = { DATA_SEED = "7" }
"#;

    #[test]
    fn parses_a_toml_job() {
        let spec = JobSpec::from_toml(GOOD).unwrap();
        assert_eq!(spec.world_size(), 4);
        assert_eq!(spec.max_restarts, 3);
        assert_eq!(spec.env["DATA_SEED"], "7");
        assert_eq!(spec.checkpoint_dir.as_deref(), Some("runs/small"));
    }

    fn field_of(text: &str) -> String {
        JobSpec::from_toml(text).unwrap_err().field
    }

    #[test]
    fn bad_specs_name_the_field() {
        assert_eq!(field_of(&format!("{GOOD}\nbogus = 1\n")), "bogus");
        assert_eq!(field_of("name = \"x\"\n"), "argv");
        assert_eq!(field_of(&GOOD.replace("ranks_per_node = 2", "ranks_per_node = 0")), "ranks_per_node");
        assert_eq!(field_of(&GOOD.replace("nodes = 2\n", "nodes = 0\n")), "nodes");
        assert_eq!(field_of(&GOOD.replace("runs/small", "../../etc")), "checkpoint_dir");
        assert_eq!(field_of(&GOOD.replace("runs/small", "/etc/cron.d")), "checkpoint_dir");
        assert_eq!(field_of(&GOOD.replace("gpt-small", "../evil")), "name");
        assert_eq!(field_of(&GOOD.replace("DATA_SEED", "RANK")), "env.RANK");
        assert_eq!(field_of(&GOOD.replace("nodes = 2\n", "nodes = \"two\"\n")), "nodes");
        assert!(JobSpec::from_toml("name = [").is_err());
    }

    #[test]
    fn json_follows_the_same_rules() {
        let spec = JobSpec::from_json(br#"{"name":"a","argv":["true"]}"#).unwrap();
        assert_eq!((spec.nodes, spec.ranks_per_node, spec.max_restarts), (1, 1, 0));
        let e = JobSpec::from_json(br#"{"name":"a","argv":["true"],"nodez":2}"#).unwrap_err();
        assert_eq!(e.field, "nodez");
    }
}
