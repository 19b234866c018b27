//! Fault classes and their rates. The default is Llama 3's 54-day interruption table (419
//! unexpected interruptions on 16,384 GPUs), turned into a rate per GPU-hour per component.

use crate::SimError;

/// What a fault does to the job, which decides how Myriad detects it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// A rank process dies (a software bug): its agent sees the exit at once.
    Crash,
    /// A rank stops making progress (a collective that never completes): found by the agent's
    /// hang detector.
    Hang,
    /// The node drops out (GPU, memory, NIC, host): its agent falls silent until the node is
    /// repaired. Myriad's agents run no GPU health check yet, so a hardware fault is modelled as
    /// what such a check would do: take the node out.
    Node,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FaultClass {
    pub name: String,
    pub kind: FaultKind,
    /// Faults per GPU-hour.
    pub rate_per_gpu_hour: f64,
}

/// GPUs and hours of the Llama 3 snapshot the table counts.
pub const LLAMA3_GPUS: f64 = 16_384.0;
pub const LLAMA3_HOURS: f64 = 54.0 * 24.0;

const LLAMA3_CSV: &str = include_str!("../data/llama3_interruptions.csv");

/// Llama 3's interruption classes as rates (interruptions / (16,384 GPUs × 54 days)).
pub fn llama3() -> Vec<FaultClass> {
    from_csv(LLAMA3_CSV, LLAMA3_GPUS * LLAMA3_HOURS).expect("the embedded table parses")
}

/// Reads a table with `component`, `category` and `interruptions` columns, the counts observed
/// over `gpu_hours`. Software bugs crash a rank; the collective watchdog's timeouts are hangs;
/// everything else is hardware that takes its node out.
pub fn from_csv(text: &str, gpu_hours: f64) -> Result<Vec<FaultClass>, SimError> {
    let mut rows = text.lines().filter(|l| !l.trim().is_empty()).map(split_csv_line);
    let header = rows.next().ok_or_else(|| SimError::new("rates", "the table is empty"))?;
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| SimError::new("rates", format!("the table has no `{name}` column")))
    };
    let (component, category, count) = (col("component")?, col("category")?, col("interruptions")?);
    let mut classes = Vec::new();
    for (i, row) in rows.enumerate() {
        let field = |c: usize| row.get(c).map(|s| s.trim()).unwrap_or("");
        let n: f64 = field(count).parse().map_err(|_| {
            SimError::new("rates", format!("row {}: interruptions {:?} is not a number", i + 2, field(count)))
        })?;
        let name = field(component).to_string();
        let kind = if field(category).eq_ignore_ascii_case("software") {
            FaultKind::Crash
        } else if name.to_ascii_lowercase().contains("watchdog") {
            FaultKind::Hang
        } else {
            FaultKind::Node
        };
        classes.push(FaultClass { name, kind, rate_per_gpu_hour: n / gpu_hours });
    }
    Ok(classes)
}

/// One CSV line, with RFC 4180 quoting (a quoted field may hold commas and doubled quotes).
fn split_csv_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                fields.last_mut().expect("one field").push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(String::new()),
            (c, _) => fields.last_mut().expect("one field").push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_llama3_table_sums_to_419_interruptions() {
        let classes = llama3();
        assert_eq!(classes.len(), 12);
        let total: f64 =
            classes.iter().map(|c| c.rate_per_gpu_hour).sum::<f64>() * LLAMA3_GPUS * LLAMA3_HOURS;
        assert!((total - 419.0).abs() < 1e-9, "{total}");
        let kind = |name: &str| classes.iter().find(|c| c.name == name).unwrap().kind;
        assert_eq!(kind("Software bug"), FaultKind::Crash);
        assert_eq!(kind("NCCL watchdog timeout"), FaultKind::Hang);
        assert_eq!(kind("Faulty GPU"), FaultKind::Node);
    }

    #[test]
    fn quoted_fields_keep_their_commas() {
        assert_eq!(split_csv_line(r#"a,"b, c",d"#), ["a", "b, c", "d"]);
        assert_eq!(split_csv_line(r#""say ""hi""",x"#), [r#"say "hi""#, "x"]);
    }

    #[test]
    fn a_bad_table_names_the_problem() {
        let e = from_csv("component,category\nx,GPU\n", 1.0).unwrap_err();
        assert!(e.to_string().contains("interruptions"), "{e}");
        let e = from_csv("component,category,interruptions\nx,GPU,many\n", 1.0).unwrap_err();
        assert!(e.to_string().contains("\"many\""), "{e}");
    }
}
