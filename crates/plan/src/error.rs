//! One error type for the planner: every variant names the field or constraint that failed, so
//! the CLI can print it as one line.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum PlanError {
    /// A required field is absent from a model or hardware description.
    MissingField { source: String, field: String },
    /// A field is present but its value cannot be used.
    BadField { source: String, field: String, why: String },
    /// A text file could not be parsed at all (CSV, JSON, TOML).
    Parse { source: String, why: String },
    /// A layout breaks a divisibility or placement rule; `constraint` reads like `heads % tp == 0`.
    Layout { constraint: String, detail: String },
    /// Nothing in the search space uses this many GPUs or fits in memory.
    NoLayout { gpus: u64, why: String },
    /// A name (model preset, GPU) is not known.
    Unknown { what: String, name: String, known: Vec<String> },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::MissingField { source, field } => write!(f, "{source}: missing field `{field}`"),
            PlanError::BadField { source, field, why } => write!(f, "{source}: field `{field}`: {why}"),
            PlanError::Parse { source, why } => write!(f, "{source}: {why}"),
            PlanError::Layout { constraint, detail } => {
                write!(f, "layout breaks `{constraint}`: {detail}")
            }
            PlanError::NoLayout { gpus, why } => write!(f, "no layout uses {gpus} GPUs: {why}"),
            PlanError::Unknown { what, name, known } => {
                write!(f, "unknown {what} {name:?}; known: {}", known.join(", "))
            }
        }
    }
}

impl std::error::Error for PlanError {}

pub type Result<T> = std::result::Result<T, PlanError>;
