//! `plan validate`: predict each published run's MFU (or HFU) for its published layout and compare.
//!
//! Rules applied uniformly to every row (no per-run factors; printed by the CLI):
//! 1. Target: `mfu_pct` when given, else `hfu_pct`; rows with neither are skipped.
//! 2. Model: the built-in preset the `model` column means, matched by family and size
//!    ([`preset_for`]); otherwise a GPT (MHA, 4h GELU MLP) of the row's `layers`, `hidden`,
//!    `heads` (hidden/128 when absent) and the vocabulary in `notes` ("vocab N"), or 51,200 for a
//!    GPT-named model ([`default_vocab`]).
//! 3. Split: `tp`/`pp` columns (pp = 1 when only tp is given); a note "TP*PP=N" gives
//!    tp = min(8, N), pp = N/tp; FSDP with no tp/pp means tp = pp = 1; otherwise skipped.
//!    dp = gpus/(tp·pp·cp) when the dp column is not a plain number. cp, ep and micro-batch
//!    default to 1 (vp: see 5).
//! 4. Batch: `global_batch_seqs`, else tokens/seq, else one micro-batch per data-parallel rank.
//! 5. ZeRO: "ZeRO-n" → n, "FSDP" → 3, a note "overlap-param-gather" (distributed optimizer) → 1.
//!    Recompute: "selective" → selective; "full", "checkpointing", "rematerialization" → full.
//!    Sequence parallelism when the row says "sequence parallel" or "tp-comm-overlap".
//!    Sequence parallelism is also assumed with TP from 2023 on ([`SEQUENCE_PARALLEL_YEAR`]).
//!    An unstated vp of a pipelined layout is the fitting interleaving of highest MFU
//!    ([`layout_for`]).
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

/// Sequence parallelism (Korthikanti et al. 2022) became the default way to run tensor
/// parallelism in Megatron-Core and other stacks by 2023.
pub const SEQUENCE_PARALLEL_YEAR: u32 = 2023;

pub const RULES: &[&str] = &[
    "target: mfu_pct when given, else hfu_pct (rows with neither are skipped)",
    "model: the built-in preset the `model` name means by family and size (Llama 2/3/3.1, GPT-3, MT-NLG, Mixtral, DeepSeek-V3, Qwen2.5, PaLM, BLOOM, MPT), else a GPT (MHA, 4h GELU) of the row's shape; heads = hidden/128 when absent; vocab from notes, else 51200 for GPT-named models (Megatron's padded GPT-2 BPE)",
    "split: tp/pp columns (pp = 1 when only tp given); note TP*PP=N gives tp = min(8, N), pp = N/tp; FSDP alone gives tp = pp = 1",
    "dp = gpus/(tp*pp*cp) when not a plain number; cp, ep, micro-batch default to 1",
    "batch: global_batch_seqs, else tokens/seq, else one micro-batch per data-parallel rank",
    "ZeRO-n -> n, FSDP -> 3, overlap-param-gather -> 1; recompute from the recompute column; SP when stated, with tp-comm-overlap, or with TP in a source dated 2023 or later",
    "vp not given with pp > 1: the interleaving (of the search's 1, 2, 3, 4, 6, 8) of the highest predicted MFU that fits, as a tuned run would use",
    "overlap: TP when notes say tp-comm-overlap; gradients when overlap-grad-reduce or FSDP; uneven pipeline stages allowed",
    "flash attention unless the source is dated before 2023 (the latest year or arXiv id it names)",
    "FLOPs: 6N-style -> 6*(params)+12*l*h*s; Megatron 72*/96* formulas -> 6*(matmul weights)+12*l*h*s; empty -> 6N",
];

#[derive(Debug, Clone, Serialize)]
pub struct Validated {
    pub row: usize,
    pub model: String,
    pub source: String,
    pub gpu: String,
    pub gpus: u64,
    /// "MFU" or "HFU".
    pub metric: &'static str,
    pub published_pct: f64,
    pub predicted_pct: f64,
    pub error_pts: f64,
    /// Predicted with the calibration fitted on the other sources' rows alone.
    pub held_out_pct: f64,
    pub held_out_error_pts: f64,
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
    /// In-sample: with the calibration fitted on every row.
    pub mae_pts: f64,
    /// Out-of-sample: leave-one-source-out.
    pub held_out_mae_pts: f64,
    /// Sources with a validated row (the folds of the cross-validation).
    pub sources: usize,
    /// The calibration fitted on every row.
    pub calibration: Vec<Fitted>,
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

/// The built-in preset a run's model name means, matched by family and size the way the common
/// spellings write them: "Llama 3 405B", "LLAMA3.1 405B", "Llama-2-70b", "GPT-3 175B", "GPT3
/// 175B", "Mixtral 8x7B", "DeepSeek-V3", "Qwen2.5 72B", "PaLM 540B", "BLOOM 176B", "MPT 30B".
/// Names with no preset (shapes given in the row's columns) return None.
pub fn preset_for(name: &str) -> Option<Model> {
    let n = name.to_ascii_lowercase().replace(['-', '_'], " ");
    // "llama 3.1" and "llama3.1" alike: the family glued to its version.
    let squashed: String = n.split_whitespace().collect::<Vec<_>>().join("");
    let has = |s: &str| squashed.contains(s);
    // The size: a word like "405b", "8x7b" or "1t" (the first one, so "arch (LlamaT)" is no size).
    let size = n.split(|c: char| !c.is_ascii_alphanumeric() && c != '.').find(|w| {
        w.len() > 1
            && (w.ends_with('b') || w.ends_with('t'))
            && w[..w.len() - 1].chars().all(|c| c.is_ascii_digit() || c == 'x' || c == '.')
            && w.starts_with(|c: char| c.is_ascii_digit())
    });
    let key = match () {
        _ if has("palm") && size == Some("540b") => "palm-540b",
        _ if has("bloom") => "bloom-176b",
        _ if has("mpt") && size == Some("70b") => "mpt-70b",
        _ if has("mpt") && size == Some("30b") => "mpt-30b",
        _ if has("mixtral") && size == Some("8x7b") => "mixtral-8x7b",
        _ if has("mixtral") && size == Some("8x22b") => "mixtral-8x22b",
        _ if has("deepseekv3") => "deepseek-v3",
        _ if has("qwen2.5") || has("qwen2") => match size {
            Some("7b") => "qwen2.5-7b",
            Some("72b") => "qwen2.5-72b",
            _ => return None,
        },
        _ if has("llama3") => match size {
            Some("8b") => "llama3-8b",
            Some("70b") => "llama3-70b",
            Some("405b") => "llama3-405b",
            _ => return None,
        },
        _ if has("llama2") => match size {
            Some("7b") => "llama2-7b",
            Some("13b") => "llama2-13b",
            Some("70b") => "llama2-70b",
            _ => return None,
        },
        _ if has("gpt3") && size == Some("175b") => "gpt3-175b",
        _ if (has("mtnlg") || has("megatronturing")) && size == Some("530b") => "mt-nlg-530b",
        _ => return None,
    };
    model::preset(key).ok()
}

/// The vocabulary a family's runs use when a row leaves it out: GPT-named models trained with
/// Megatron's GPT-2 BPE, padded to 51,200 (every GPT row that states it says so).
pub fn default_vocab(model: &str) -> Option<u64> {
    model.to_ascii_lowercase().starts_with("gpt").then_some(GPT_VOCAB)
}

pub const GPT_VOCAB: u64 = 51_200;

/// What one row turns into: the job, hardware, software and published layout, or why not.
pub struct RowSetup {
    /// The row states its virtual pipeline stages; otherwise [`layout_for`] picks them.
    pub vp_given: bool,
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
    let seq = plain_u64(g("seq_len")).ok_or("seq_len not given")?;
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
            let vocab = number_after(notes, "vocab ")
                .or_else(|| default_vocab(g("model")))
                .ok_or("vocabulary not given and no default for this model family")?;
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
    let year = source_year(g("source"));
    // Sequence parallelism is how tensor parallelism is run since 2023 (Megatron-Core's default
    // with TP, TorchTitan's); before, only where the row says so.
    let sp = tp > 1
        && (rc.contains("sequence parallel")
            || notes.contains("tp-comm-overlap")
            || year.is_some_and(|y| y >= SEQUENCE_PARALLEL_YEAR));
    let sw = Software {
        tp_comm_overlap: notes.contains("tp-comm-overlap"),
        dp_overlap: notes.contains("overlap-grad-reduce") || fsdp,
        flash_attention: year.is_none_or(|y| y >= FLASH_ATTENTION_YEAR),
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
    let vp_given = plain_u64(g("vp")).is_some();
    Ok(RowSetup { vp_given, job, hw, sw, layout, metric, published_pct })
}

/// A row ready to predict, with the source it came from (the unit left out in cross-validation).
struct Prepared {
    row: usize,
    model: String,
    source: String,
    setup: RowSetup,
}

/// Calibration fitted for one GPU generation.
#[derive(Debug, Clone, Serialize)]
pub struct Fitted {
    pub generation: String,
    pub gemm_eff: f64,
    pub attn_eff: f64,
    pub runs: usize,
    pub mae_pts: f64,
}

/// The grid the two fitted efficiencies are searched on: gemm_eff 0.50..0.90 by 0.02, attn_eff
/// 0.10..0.80 by 0.05 (ties go to the smaller values).
fn grid() -> impl Iterator<Item = (f64, f64)> {
    (25..=45).flat_map(|g| (2..=16).map(move |a| (g as f64 * 0.02, a as f64 * 0.05)))
}

/// The row's layout; where it leaves the virtual pipeline stages out of a pipelined layout, the
/// interleaving a tuned run would use: of those the search tries ([`crate::search::VIRTUAL`]),
/// the vp of the highest predicted MFU among those that fit, vp = 1 when none does.
pub fn layout_for(r: &RowSetup, hw: &Hardware) -> Layout {
    if r.vp_given || r.layout.pp == 1 {
        return r.layout;
    }
    let mut best = (r.layout, f64::NEG_INFINITY);
    for vp in crate::search::VIRTUAL.into_iter().filter(|&v| v * r.layout.pp <= r.job.model.layers) {
        let l = Layout { vp, ..r.layout };
        if l.check(&r.job, hw, &r.sw).is_err() {
            continue;
        }
        let p = predict(&r.job, hw, &l, &r.sw);
        if p.fits && p.mfu > best.1 {
            best = (l, p.mfu);
        }
    }
    best.0
}

/// Predicted percentage (MFU or HFU, as the row publishes) with `hw`'s calibration.
fn pct_for(r: &RowSetup, hw: &Hardware) -> f64 {
    let p = predict(&r.job, hw, &layout_for(r, hw), &r.sw);
    100.0 * if r.metric == "MFU" { p.mfu } else { p.hfu }
}

/// Fits (gemm_eff, attn_eff) per GPU generation on `rows`: the grid point with the least mean
/// absolute error over that generation's rows. Hardware of no fitted generation is not fitted.
fn fit(rows: &[&Prepared]) -> Vec<Fitted> {
    let mut out = Vec::new();
    for generation in crate::hardware::FITTED_GENERATIONS {
        let mine: Vec<&Prepared> = rows
            .iter()
            .copied()
            .filter(|r| crate::hardware::generation(&r.setup.hw.name) == Some(generation))
            .collect();
        if mine.is_empty() {
            continue;
        }
        let mut best: Option<Fitted> = None;
        for (gemm_eff, attn_eff) in grid() {
            let mae = mine
                .iter()
                .map(|r| {
                    let mut hw = r.setup.hw.clone();
                    hw.calibration.gemm_eff = gemm_eff;
                    hw.calibration.attn_eff = attn_eff;
                    (pct_for(&r.setup, &hw) - r.setup.published_pct).abs()
                })
                .sum::<f64>()
                / mine.len() as f64;
            if best.as_ref().is_none_or(|b| mae < b.mae_pts - 1e-12) {
                best = Some(Fitted {
                    generation: generation.into(),
                    gemm_eff,
                    attn_eff,
                    runs: mine.len(),
                    mae_pts: mae,
                });
            }
        }
        out.extend(best);
    }
    out
}

/// `hw` with the calibration `fitted` gives its generation; hardware of a generation not fitted
/// there takes the mean of the fitted generations (the built-in UNFITTED rule).
fn calibrated(hw: &Hardware, fitted: &[Fitted]) -> Hardware {
    let mut hw = hw.clone();
    let own = crate::hardware::generation(&hw.name).and_then(|g| fitted.iter().find(|f| f.generation == g));
    let (g, a) = match own {
        Some(f) => (f.gemm_eff, f.attn_eff),
        None if fitted.is_empty() => (hw.calibration.gemm_eff, hw.calibration.attn_eff),
        None => {
            let n = fitted.len() as f64;
            (
                fitted.iter().map(|f| f.gemm_eff).sum::<f64>() / n,
                fitted.iter().map(|f| f.attn_eff).sum::<f64>() / n,
            )
        }
    };
    hw.calibration.gemm_eff = g;
    hw.calibration.attn_eff = a;
    hw
}

/// Validates every row of a CSV in published_runs.csv's format. In-sample: the calibration is
/// fitted on every row and each row predicted with it. Out-of-sample (leave-one-source-out):
/// each source's rows are predicted with the calibration fitted on the other sources' rows
/// alone. `with_search` also runs the layout search per validated row.
pub fn validate(source: &str, text: &str, with_search: bool) -> Result<Report> {
    let t = Table::parse(source, text)?;
    for c in ["source", "model", "gpu", "gpu_count", "mfu_pct", "hfu_pct", "flops_convention"] {
        if t.col(c).is_none() {
            return Err(crate::PlanError::MissingField { source: source.into(), field: c.into() });
        }
    }
    let mut prepared = Vec::new();
    let mut skipped = Vec::new();
    for (i, row) in t.rows.iter().enumerate() {
        let model = t.get(row, "model").to_string();
        let rownum = i + 2; // 1-based, after the header line
        match setup_row(&t, row) {
            Err(reason) => skipped.push(Skipped { row: rownum, model, reason }),
            Ok(setup) => prepared.push(Prepared {
                row: rownum,
                model,
                source: t.get(row, "source").to_string(),
                setup,
            }),
        }
    }
    let all: Vec<&Prepared> = prepared.iter().collect();
    let calibration = fit(&all);
    // Each fold: the calibration fitted without one source's rows.
    let held_out: std::collections::BTreeMap<&str, Vec<Fitted>> = prepared
        .iter()
        .map(|r| r.source.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|s| (s, fit(&prepared.iter().filter(|o| o.source != s).collect::<Vec<_>>())))
        .collect();
    let mut runs = Vec::new();
    for r in &prepared {
        let hw = calibrated(&r.setup.hw, &calibration);
        let p = predict(&r.setup.job, &hw, &layout_for(&r.setup, &hw), &r.setup.sw);
        let predicted_pct = 100.0 * if r.setup.metric == "MFU" { p.mfu } else { p.hfu };
        let held_out_pct = pct_for(&r.setup, &calibrated(&r.setup.hw, &held_out[r.source.as_str()]));
        let best = if with_search {
            search(&r.setup.job, &hw, &r.setup.sw, 1).ok().map(|mut v| v.remove(0))
        } else {
            None
        };
        runs.push(Validated {
            row: r.row,
            model: r.model.clone(),
            source: r.source.clone(),
            gpu: hw.name.clone(),
            gpus: r.setup.job.gpus,
            metric: r.setup.metric,
            published_pct: r.setup.published_pct,
            predicted_pct,
            error_pts: predicted_pct - r.setup.published_pct,
            held_out_pct,
            held_out_error_pts: held_out_pct - r.setup.published_pct,
            best_mfu_pct: best.as_ref().map_or(f64::NAN, |b| 100.0 * b.mfu),
            published_layout_mfu_pct: 100.0 * p.mfu,
            prediction: p,
            best,
        });
    }
    let mean_abs = |f: &dyn Fn(&Validated) -> f64| {
        if runs.is_empty() {
            f64::NAN
        } else {
            runs.iter().map(|r| f(r).abs()).sum::<f64>() / runs.len() as f64
        }
    };
    let mae_pts = mean_abs(&|r| r.error_pts);
    let held_out_mae_pts = mean_abs(&|r| r.held_out_error_pts);
    Ok(Report {
        runs,
        skipped,
        mae_pts,
        held_out_mae_pts,
        sources: prepared.iter().map(|r| r.source.as_str()).collect::<std::collections::BTreeSet<_>>().len(),
        calibration,
        rules: RULES.iter().map(|s| s.to_string()).collect(),
    })
}
