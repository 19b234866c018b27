//! `plan validate`: predict each published run's MFU (or HFU) for its published layout and compare.
//!
//! Rules applied uniformly to every row (no per-run factors; printed by the CLI):
//! 1. Target: `mfu_pct` when given, else `hfu_pct`; rows with neither are skipped.
//! 2. Model: the built-in preset the `model` column names (PaLM 540B, BLOOM 176B, MPT 30B/70B,
//!    Llama 2 7B) when there is one; otherwise a GPT (MHA, 4h GELU MLP) of the row's `layers`,
//!    `hidden`, `heads` (hidden/128 when absent) and the vocabulary in `notes` ("vocab N").
//! 3. Split: `tp`/`pp` columns (pp = 1 when only tp is given); a note "TP*PP=N" gives
//!    tp = min(8, N), pp = N/tp; FSDP with no tp/pp means tp = pp = 1; otherwise skipped.
//!    dp = gpus/(tp·pp·cp) when the dp column is not a plain number. cp, ep, vp, micro-batch
//!    default to 1.
//! 4. Batch: `global_batch_seqs`, else tokens/seq, else one micro-batch per data-parallel rank.
//! 5. ZeRO: "ZeRO-n" → n, "FSDP" → 3, a note "overlap-param-gather" (distributed optimizer) → 1.
//!    Recompute: "selective" → selective; "full", "checkpointing", "rematerialization" → full.
//!    Sequence parallelism when the row says "sequence parallel" or "tp-comm-overlap".
//! 6. Software: TP overlap when notes say "tp-comm-overlap"; gradient/parameter overlap when they
//!    say "overlap-grad-reduce" or the run uses FSDP; uneven pipeline stages allowed; flash
//!    attention unless the source is dated before 2023.
//! 7. FLOPs convention: "6N"-style text → SixN; Megatron's 72·/96· formulas,
//!    `num_floating_point_operations` or DeepSpeed's "4*2 coefficient" → Megatron; empty → SixN.

use crate::csv::Table;
use crate::error::Result;
use crate::hardware::{lookup, Hardware};
use crate::layout::{Job, Layout, Precision, Software};
use crate::model::{self, FlopsConvention, Model, Recompute};
use crate::perf::{predict, Prediction};
use crate::search::search;
use serde::Serialize;

pub const PUBLISHED_RUNS_CSV: &str = include_str!("../data/published_runs.csv");

/// FlashAttention appeared in mid-2022 and entered Megatron and PyTorch in 2023: runs whose
/// source is dated before 2023 materialise the attention scores.
pub const FLASH_ATTENTION_YEAR: u32 = 2023;

pub const RULES: &[&str] = &[
    "target: mfu_pct when given, else hfu_pct (rows with neither are skipped)",
    "model: built-in preset named by `model` when one exists, else a GPT (MHA, 4h GELU) of the row's shape; heads = hidden/128 when absent; vocab from notes",
    "split: tp/pp columns (pp = 1 when only tp given); note TP*PP=N gives tp = min(8, N), pp = N/tp; FSDP alone gives tp = pp = 1",
    "dp = gpus/(tp*pp*cp) when not a plain number; cp, ep, vp, micro-batch default to 1",
    "batch: global_batch_seqs, else tokens/seq, else one micro-batch per data-parallel rank",
    "ZeRO-n -> n, FSDP -> 3, overlap-param-gather -> 1; recompute from the recompute column; SP when stated or with tp-comm-overlap",
    "overlap: TP when notes say tp-comm-overlap; gradients when overlap-grad-reduce or FSDP; uneven pipeline stages allowed",
    "flash attention unless the source is dated before 2023 (the latest year or arXiv id it names)",
    "FLOPs: 6N-style -> 6*(params)+12*l*h*s; Megatron 72*/96* formulas -> 6*(matmul weights)+12*l*h*s; empty -> 6N",
];

#[derive(Debug, Clone, Serialize)]
pub struct Validated {
    pub row: usize,
    pub model: String,
    pub gpu: String,
    pub gpus: u64,
    /// "MFU" or "HFU".
    pub metric: &'static str,
    pub published_pct: f64,
    pub predicted_pct: f64,
    pub error_pts: f64,
    pub prediction: Prediction,
    /// Best layout the search finds for the same job, and its MFU next to the published layout's.
    pub best: Option<Prediction>,
    pub best_mfu_pct: f64,
    pub published_layout_mfu_pct: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub row: usize,
    pub model: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub runs: Vec<Validated>,
    pub skipped: Vec<Skipped>,
    pub mae_pts: f64,
    pub rules: Vec<String>,
}

fn leading_u64(s: &str) -> Option<u64> {
    let digits: String = s.trim().chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

fn plain_u64(s: &str) -> Option<u64> {
    s.trim().parse().ok()
}

fn plain_f64(s: &str) -> Option<f64> {
    s.trim().parse().ok()
}

/// The number after `key` in `text` ("vocab 51200" → 51200).
fn number_after(text: &str, key: &str) -> Option<u64> {
    let i = text.find(key)?;
    leading_u64(&text[i + key.len()..])
}

fn preset_for(name: &str) -> Option<Model> {
    let n = name.to_ascii_lowercase();
    let key = if n.contains("palm 540b") {
        "palm-540b"
    } else if n.contains("bloom") {
        "bloom-176b"
    } else if n.contains("mpt 70b") {
        "mpt-70b"
    } else if n.contains("mpt 30b") {
        "mpt-30b"
    } else if n.contains("llama 2 7b") {
        "llama2-7b"
    } else {
        return None;
    };
    model::preset(key).ok()
}

/// What one row turns into: the job, hardware, software and published layout, or why not.
pub struct RowSetup {
    pub job: Job,
    pub hw: Hardware,
    pub sw: Software,
    pub layout: Layout,
    pub metric: &'static str,
    pub published_pct: f64,
}

/// The latest year (2015–2039) the source text names, from "2021", "Jul-2024" or an arXiv id
/// such as 2204.02311.
pub fn source_year(source: &str) -> Option<u32> {
    let b = source.as_bytes();
    let mut best = None;
    for i in 0..b.len().saturating_sub(3) {
        let before_ok = i == 0 || !b[i - 1].is_ascii_digit();
        if !before_ok {
            continue;
        }
        let w = &b[i..(i + 4).min(b.len())];
        if w.len() == 4 && w.iter().all(u8::is_ascii_digit) {
            let n: u32 = std::str::from_utf8(w).unwrap().parse().unwrap();
            let after = b.get(i + 4).copied();
            if (2015..2040).contains(&n) && !after.is_some_and(|c| c.is_ascii_digit()) {
                best = best.max(Some(n));
            } else if after == Some(b'.') && (1500..4000).contains(&n) {
                // arXiv YYMM.NNNNN
                best = best.max(Some(2000 + n / 100));
            }
        }
    }
    best
}

pub fn setup_row(t: &Table, row: &[String]) -> std::result::Result<RowSetup, String> {
    let g = |c: &str| t.get(row, c);
    let notes = g("notes");
    let (metric, published_pct) = match (plain_f64(g("mfu_pct")), plain_f64(g("hfu_pct"))) {
        (Some(m), _) => ("MFU", m),
        (None, Some(h)) => ("HFU", h),
        _ => return Err("no MFU or HFU published".into()),
    };
    let gpus = plain_u64(g("gpu_count")).ok_or("gpu_count not given")?;
    let seq = plain_u64(g("seq_len")).ok_or("seq_len not given")?;
    let hw = lookup(g("gpu")).map_err(|e| e.to_string())?;
    let zero_text = format!("{} {}", g("zero_fsdp"), g("dp"));
    let fsdp = zero_text.contains("FSDP");
    let (tp, pp) = match (plain_u64(g("tp")), plain_u64(g("pp"))) {
        (Some(t), Some(p)) => (t, p),
        (Some(t), None) => (t, 1),
        (None, _) => match number_after(notes, "TP*PP=") {
            Some(mp) => {
                let t = mp.min(8);
                (t, mp / t)
            }
            None if fsdp => (1, 1),
            None => return Err("tensor/pipeline split not given".into()),
        },
    };
    let cp = plain_u64(g("cp")).unwrap_or(1);
    let ep = plain_u64(g("ep")).unwrap_or(1);
    let vp = plain_u64(g("vp")).unwrap_or(1);
    let micro_batch = plain_u64(g("micro_batch")).unwrap_or(1);
    if tp * pp * cp == 0 || !gpus.is_multiple_of(tp * pp * cp) {
        return Err(format!("tp*pp*cp = {} does not divide {gpus} GPUs", tp * pp * cp));
    }
    let dp = match plain_u64(g("dp")) {
        Some(d) if d * tp * pp * cp == gpus => d,
        Some(d) => return Err(format!("tp*pp*dp*cp = {} but gpu_count = {gpus}", d * tp * pp * cp)),
        None => gpus / (tp * pp * cp),
    };
    let m = match preset_for(g("model")) {
        Some(m) => m,
        None => {
            let layers = plain_u64(g("layers")).ok_or("layers not given and no preset for this model")?;
            let hidden = plain_u64(g("hidden")).ok_or("hidden not given and no preset for this model")?;
            let heads = leading_u64(g("heads")).unwrap_or((hidden / 128).max(1));
            let vocab = number_after(notes, "vocab ").ok_or("vocabulary not given")?;
            model::gpt(g("model"), layers, hidden, heads, vocab)
        }
    };
    let global_batch_seqs = plain_u64(g("global_batch_seqs"))
        .or_else(|| plain_u64(g("global_batch_tokens")).map(|x| x / seq))
        .unwrap_or(dp * micro_batch);
    let zero = if let Some(n) = number_after(&zero_text, "ZeRO-") {
        n as u8
    } else if fsdp {
        3
    } else if notes.contains("overlap-param-gather") {
        1
    } else {
        0
    };
    let rc = g("recompute").to_ascii_lowercase();
    let recompute = if rc.contains("selective") {
        Recompute::Selective
    } else if rc.contains("full") || rc.contains("checkpointing") || rc.contains("rematerialization") {
        Recompute::Full
    } else {
        Recompute::None
    };
    let sp = tp > 1 && (rc.contains("sequence parallel") || notes.contains("tp-comm-overlap"));
    let sw = Software {
        tp_comm_overlap: notes.contains("tp-comm-overlap"),
        dp_overlap: notes.contains("overlap-grad-reduce") || fsdp,
        flash_attention: source_year(g("source")).is_none_or(|y| y >= FLASH_ATTENTION_YEAR),
        uneven_pipeline: true,
        tp_across_nodes: false,
    };
    let prec = g("precision").to_ascii_lowercase();
    let precision = if prec.contains("fp8") {
        Precision::Fp8
    } else if prec.contains("fp16") && !prec.contains("bf16") {
        Precision::Fp16
    } else {
        Precision::Bf16
    };
    let conv_text = g("flops_convention");
    let convention = if conv_text.contains("72*")
        || conv_text.contains("96*")
        || conv_text.contains("num_floating_point_operations")
        || conv_text.contains("4*2 coefficient")
    {
        FlopsConvention::Megatron
    } else {
        FlopsConvention::SixN
    };
    let job = Job { model: m, seq, global_batch_seqs, gpus, precision, convention };
    let layout = Layout { tp, pp, vp, dp, cp, ep, micro_batch, zero, recompute, sp };
    layout.check(&job, &hw, &sw).map_err(|e| e.to_string())?;
    Ok(RowSetup { job, hw, sw, layout, metric, published_pct })
}

/// Validates every row of a CSV in published_runs.csv's format. `with_search` also runs the
/// layout search per validated row.
pub fn validate(source: &str, text: &str, with_search: bool) -> Result<Report> {
    validate_with(source, text, with_search, &|_| {})
}

/// `validate` with a hook that may change each row's hardware (calibration studies).
pub fn validate_with(
    source: &str,
    text: &str,
    with_search: bool,
    tweak: &dyn Fn(&mut Hardware),
) -> Result<Report> {
    let t = Table::parse(source, text)?;
    for c in ["model", "gpu", "gpu_count", "mfu_pct", "hfu_pct", "flops_convention"] {
        if t.col(c).is_none() {
            return Err(crate::PlanError::MissingField { source: source.into(), field: c.into() });
        }
    }
    let mut runs = Vec::new();
    let mut skipped = Vec::new();
    for (i, row) in t.rows.iter().enumerate() {
        let name = t.get(row, "model").to_string();
        let rownum = i + 2; // 1-based, after the header line
        match setup_row(&t, row) {
            Err(reason) => skipped.push(Skipped { row: rownum, model: name, reason }),
            Ok(mut r) => {
                tweak(&mut r.hw);
                let p = predict(&r.job, &r.hw, &r.layout, &r.sw);
                let predicted_pct = 100.0 * if r.metric == "MFU" { p.mfu } else { p.hfu };
                let best = if with_search {
                    search(&r.job, &r.hw, &r.sw, 1).ok().map(|mut v| v.remove(0))
                } else {
                    None
                };
                runs.push(Validated {
                    row: rownum,
                    model: name,
                    gpu: r.hw.name.clone(),
                    gpus: r.job.gpus,
                    metric: r.metric,
                    published_pct: r.published_pct,
                    predicted_pct,
                    error_pts: predicted_pct - r.published_pct,
                    best_mfu_pct: best.as_ref().map_or(f64::NAN, |b| 100.0 * b.mfu),
                    published_layout_mfu_pct: 100.0 * p.mfu,
                    prediction: p,
                    best,
                });
            }
        }
    }
    let mae_pts = if runs.is_empty() {
        f64::NAN
    } else {
        runs.iter().map(|r| r.error_pts.abs()).sum::<f64>() / runs.len() as f64
    };
    Ok(Report { runs, skipped, mae_pts, rules: RULES.iter().map(|s| s.to_string()).collect() })
}
