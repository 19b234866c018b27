//! Accelerators: dense peaks, memory, links, and the few calibration constants the step-time
//! model needs for each kind. The table is built from `data/hardware.csv` (vendor data sheets)
//! plus entries the CSV lacks; a TOML file may override any field.

use crate::csv::Table;
use crate::error::{PlanError, Result};
use serde::Serialize;

const HARDWARE_CSV: &str = include_str!("../data/hardware.csv");

/// How much of each data-sheet figure real kernels reach. These are the only fitted numbers in the
/// planner: a handful per hardware kind, none per run (see `calibration_for`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Calibration {
    /// Fraction of the dense peak a large GEMM reaches (cuBLAS/cuBLASLt ceiling at training
    /// shapes, under the board's power limit).
    pub gemm_eff: f64,
    /// Fraction of the dense peak the attention core (QKᵀ, softmax, ·V, flash or not) reaches,
    /// counting its FLOPs without the causal halving, as MFU does.
    pub attn_eff: f64,
    /// Fraction of HBM bandwidth element-wise kernels (norms, activations, residuals, Adam) reach.
    pub mem_eff: f64,
    /// Fraction of the one-direction scale-up bandwidth NCCL collectives reach (bus bandwidth).
    pub scaleup_eff: f64,
    /// Fraction of the NIC line rate inter-node collectives reach.
    pub nic_eff: f64,
}

/// Fixed latencies (not fitted): per collective step on the scale-up link and the network, and
/// per kernel launch. Orders of magnitude from nccl-tests and CUDA launch overhead.
pub const SCALEUP_LATENCY_S: f64 = 8e-6;
pub const NET_LATENCY_S: f64 = 15e-6;
pub const KERNEL_LAUNCH_S: f64 = 4e-6;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hardware {
    pub name: String,
    pub bf16_tflops: f64,
    pub fp8_tflops: Option<f64>,
    /// Memory per GPU in GiB (data sheets' "80 GB" parts hold 80 GiB).
    pub hbm_gib: f64,
    pub hbm_gbps: f64,
    /// Scale-up (NVLink/ICI) bandwidth per GPU, both directions together, GB/s (as data sheets
    /// quote it); collectives use half of it in each direction.
    pub scaleup_gbps_bidir: f64,
    /// Network bandwidth per GPU, Gbit/s (one 400G NIC per H100 → 400).
    pub nic_gbit: f64,
    pub gpus_per_node: u64,
    /// GPUs that share the scale-up fabric (a node; 72 for NVL72; a TPU pod slice).
    pub scaleup_domain: u64,
    pub calibration: Calibration,
}

impl Hardware {
    pub fn peak_tflops(&self, p: crate::Precision) -> f64 {
        match p {
            crate::Precision::Fp8 => self.fp8_tflops.unwrap_or(self.bf16_tflops),
            _ => self.bf16_tflops,
        }
    }
    /// One-direction achievable scale-up bandwidth, bytes/s.
    pub fn scaleup_bytes_s(&self) -> f64 {
        self.scaleup_gbps_bidir / 2.0 * 1e9 * self.calibration.scaleup_eff
    }
    /// Achievable network bandwidth per GPU, bytes/s.
    pub fn nic_bytes_s(&self) -> f64 {
        self.nic_gbit / 8.0 * 1e9 * self.calibration.nic_eff
    }
    pub fn hbm_bytes_s(&self) -> f64 {
        self.hbm_gbps * 1e9 * self.calibration.mem_eff
    }
}

/// Calibration by hardware kind.
///
/// Only `gemm_eff` and `attn_eff` were fitted, once per GPU generation, against the published runs
/// of that GPU (A100: Narayanan et al. 2021, Korthikanti et al. 2022, BLOOM, the FSDP blog; H100:
/// the Megatron-Core 2024 table, MPT, Llama 3 405B). The others come from public microbenchmarks:
/// - `scaleup_eff`: nccl-tests all-reduce bus bandwidth ≈ 230 GB/s of 300 on A100 NVLink3,
///   ≈ 360 of 450 on H100 NVLink4 (≈ 0.77–0.80).
/// - `nic_eff`: InfiniBand collectives reach ≈ 85% of line rate.
/// - `mem_eff`: STREAM-like kernels reach ≈ 80–90% of HBM bandwidth.
///
/// H200 and H800 share H100's compute die and take its values. Hardware without published runs to
/// fit (TPU v4, B200, GB200, MTT S4000, ...) gets `UNFITTED`, the average of the two fitted
/// generations: expect larger errors there (PaLM on TPU v4 is predicted 4.8 points low).
pub fn calibration_for(name: &str) -> Calibration {
    let generation = generation(name);
    if generation == Some("A100") {
        Calibration {
            gemm_eff: A100_GEMM_EFF,
            attn_eff: A100_ATTN_EFF,
            mem_eff: 0.8,
            scaleup_eff: 0.77,
            nic_eff: 0.85,
        }
    } else if generation == Some("H100") {
        Calibration {
            gemm_eff: H100_GEMM_EFF,
            attn_eff: H100_ATTN_EFF,
            mem_eff: 0.8,
            scaleup_eff: 0.8,
            nic_eff: 0.85,
        }
    } else {
        UNFITTED
    }
}

/// The GPU generations with published runs to fit a calibration on.
pub const FITTED_GENERATIONS: [&str; 2] = ["A100", "H100"];

/// The generation whose calibration a GPU takes: H200 and H800 share H100's compute die.
pub fn generation(name: &str) -> Option<&'static str> {
    let n = name.to_ascii_uppercase();
    if n.contains("A100") {
        Some("A100")
    } else if n.contains("H100") || n.contains("H200") || n.contains("H800") {
        Some("H100")
    } else {
        None
    }
}

// Fitted by a grid search (step 0.02 / 0.05) minimising the mean absolute MFU/HFU error over each
// generation's rows of published_runs.csv (`myriad plan validate` fits them again and prints them;
// a test keeps these equal to that fit).
// A100: 0.76 is what cuBLAS reaches on large bf16/fp16 GEMMs (≈ 237 of 312 TFLOP/s); 0.25 for the
// 2021–22 Megatron attention core (batched GEMMs of head width 128 plus softmax, unfused).
// H100: 0.62 ≈ 610 of 989 TFLOP/s, below the ≈ 750 cuBLASLt reaches at 700 W on large bf16 GEMMs,
// and 0.45 for attention (flash-attention kernels, counted without the causal halving): the fit
// over the Megatron-Core table, MPT and Llama 3's 405B runs trades the two, as it lumps every
// per-token cost the model leaves out (launch gaps, the loss over 128k–131k-word vocabularies,
// pipeline-stage imbalance) into them. Fitted without the Llama 3 runs, it was 0.76 and 0.20.
pub const A100_GEMM_EFF: f64 = 0.76;
pub const A100_ATTN_EFF: f64 = 0.25;
pub const H100_GEMM_EFF: f64 = 0.62;
pub const H100_ATTN_EFF: f64 = 0.45;
pub const UNFITTED: Calibration = Calibration {
    gemm_eff: (A100_GEMM_EFF + H100_GEMM_EFF) / 2.0,
    attn_eff: (A100_ATTN_EFF + H100_ATTN_EFF) / 2.0,
    mem_eff: 0.8,
    scaleup_eff: 0.78,
    nic_eff: 0.85,
};

/// Entries `hardware.csv` lacks or leaves incomplete, from vendor pages:
/// H800 (NVLink 400 GB/s), GB200 (NVL72: 72 GPUs share NVLink5), TPU v4 (6 ICI links; PaLM's
/// 3,072-chip pod slices; data-centre network between pods, ≈ 100 Gbit/s per chip assumed).
fn extras() -> Vec<Hardware> {
    let hw = |name: &str, bf16, fp8, hbm, bw, su, nic, node, dom| Hardware {
        name: name.into(),
        bf16_tflops: bf16,
        fp8_tflops: fp8,
        hbm_gib: hbm,
        hbm_gbps: bw,
        scaleup_gbps_bidir: su,
        nic_gbit: nic,
        gpus_per_node: node,
        scaleup_domain: dom,
        calibration: calibration_for(name),
    };
    vec![
        hw("H800-SXM5-80GB", 989.4, Some(1978.9), 80.0, 3350.0, 400.0, 400.0, 8, 8),
        hw("GB200", 2500.0, Some(5000.0), 186.0, 8000.0, 1800.0, 800.0, 4, 72),
        hw("TPUv4", 275.0, None, 32.0, 1200.0, 300.0, 100.0, 4, 3072),
    ]
}

/// The built-in table.
pub fn builtin() -> Vec<Hardware> {
    let t = Table::parse("hardware.csv", HARDWARE_CSV).expect("embedded hardware.csv parses");
    let num = |row: &[String], c: &str| t.get(row, c).parse::<f64>().ok();
    let mut out: Vec<Hardware> = Vec::new();
    let extra = extras();
    for row in &t.rows {
        let name = t.get(row, "gpu").to_string();
        if let Some(e) = extra.iter().find(|e| e.name == name) {
            out.push(e.clone());
            continue;
        }
        let node = num(row, "gpus_per_node").unwrap_or(8.0) as u64;
        out.push(Hardware {
            calibration: calibration_for(&name),
            bf16_tflops: num(row, "bf16_dense_tflops").expect("bf16 peak in hardware.csv"),
            fp8_tflops: num(row, "fp8_dense_tflops"),
            hbm_gib: num(row, "hbm_gb").expect("hbm_gb in hardware.csv"),
            hbm_gbps: num(row, "hbm_gbps").expect("hbm_gbps in hardware.csv"),
            scaleup_gbps_bidir: num(row, "scaleup_gbps_per_gpu").unwrap_or(0.0),
            nic_gbit: num(row, "typical_nic_gbps_per_gpu").unwrap_or(0.0),
            gpus_per_node: node,
            scaleup_domain: node,
            name,
        });
    }
    for e in extra {
        match out.iter_mut().find(|h| h.name == e.name) {
            // The CSV's TPU v4 row has no link figures; take ours.
            Some(h) if h.scaleup_gbps_bidir == 0.0 => *h = e,
            Some(_) => {}
            None => out.push(e),
        }
    }
    out
}

/// Finds a built-in entry by exact name (any case) or by the family a free-text description
/// names ("A100 80GB (Selene)" → A100-SXM4-80GB, "H100 (DGX)" → H100-SXM5-80GB).
pub fn lookup(name: &str) -> Result<Hardware> {
    let all = builtin();
    if let Some(h) = all.iter().find(|h| h.name.eq_ignore_ascii_case(name)) {
        return Ok(h.clone());
    }
    let n = name.to_ascii_uppercase().replace(' ', "");
    let family = if n.contains("GB200") {
        Some("GB200")
    } else if n.contains("A100") {
        Some(if n.contains("40GB") { "A100-SXM4-40GB" } else { "A100-SXM4-80GB" })
    } else if n.contains("H100") {
        Some("H100-SXM5-80GB")
    } else if n.contains("H200") {
        Some("H200-SXM-141GB")
    } else if n.contains("H800") {
        Some("H800-SXM5-80GB")
    } else if n.contains("B200") {
        Some("B200")
    } else if n.contains("S4000") || n.contains("MTT") {
        Some("MTT-S4000")
    } else if n.contains("TPUV4") {
        Some("TPUv4")
    } else {
        None
    };
    family.and_then(|f| all.iter().find(|h| h.name == f).cloned()).ok_or_else(|| PlanError::Unknown {
        what: "GPU".into(),
        name: name.into(),
        known: all.iter().map(|h| h.name.clone()).collect(),
    })
}

/// Applies a TOML override: `name` picks the base entry (or starts a new one, which must then give
/// every figure); any of `bf16_dense_tflops`, `fp8_dense_tflops`, `hbm_gb`, `hbm_gbps`,
/// `scaleup_gbps_per_gpu`, `nic_gbps_per_gpu`, `gpus_per_node`, `scaleup_domain`, and a
/// `[calibration]` table with `gemm_eff`, `attn_eff`, `mem_eff`, `scaleup_eff`, `nic_eff`.
pub fn from_toml(source: &str, text: &str) -> Result<Hardware> {
    let table: toml::Table = toml::from_str(text)
        .map_err(|e| PlanError::Parse { source: source.into(), why: e.message().into() })?;
    let name = table
        .get("name")
        .and_then(|v| v.as_str())
        .ok_or_else(|| PlanError::MissingField { source: source.into(), field: "name".into() })?
        .to_string();
    let base = lookup(&name).ok();
    let is_new = base.is_none();
    let mut hw = base.unwrap_or(Hardware {
        name: name.clone(),
        bf16_tflops: 0.0,
        fp8_tflops: None,
        hbm_gib: 0.0,
        hbm_gbps: 0.0,
        scaleup_gbps_bidir: 0.0,
        nic_gbit: 0.0,
        gpus_per_node: 8,
        scaleup_domain: 0,
        calibration: UNFITTED,
    });
    let num = |v: &toml::Value, field: &str| -> Result<f64> {
        let x = v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
        match x {
            Some(x) if x > 0.0 && x.is_finite() => Ok(x),
            _ => Err(PlanError::BadField {
                source: source.into(),
                field: field.into(),
                why: format!("{v:?} is not a positive number"),
            }),
        }
    };
    let mut seen_domain = false;
    for (k, v) in &table {
        match k.as_str() {
            "name" => {}
            "bf16_dense_tflops" => hw.bf16_tflops = num(v, k)?,
            "fp8_dense_tflops" => hw.fp8_tflops = Some(num(v, k)?),
            "hbm_gb" => hw.hbm_gib = num(v, k)?,
            "hbm_gbps" => hw.hbm_gbps = num(v, k)?,
            "scaleup_gbps_per_gpu" => hw.scaleup_gbps_bidir = num(v, k)?,
            "nic_gbps_per_gpu" | "typical_nic_gbps_per_gpu" => hw.nic_gbit = num(v, k)?,
            "gpus_per_node" => hw.gpus_per_node = num(v, k)? as u64,
            "scaleup_domain" => {
                hw.scaleup_domain = num(v, k)? as u64;
                seen_domain = true;
            }
            "calibration" => {
                let c = v.as_table().ok_or_else(|| PlanError::BadField {
                    source: source.into(),
                    field: "calibration".into(),
                    why: "must be a table".into(),
                })?;
                for (ck, cv) in c {
                    let field = format!("calibration.{ck}");
                    let x = num(cv, &field)?;
                    if x > 1.0 {
                        return Err(PlanError::BadField {
                            source: source.into(),
                            field,
                            why: "an efficiency is at most 1".into(),
                        });
                    }
                    match ck.as_str() {
                        "gemm_eff" => hw.calibration.gemm_eff = x,
                        "attn_eff" => hw.calibration.attn_eff = x,
                        "mem_eff" => hw.calibration.mem_eff = x,
                        "scaleup_eff" => hw.calibration.scaleup_eff = x,
                        "nic_eff" => hw.calibration.nic_eff = x,
                        _ => {
                            return Err(PlanError::BadField {
                                source: source.into(),
                                field,
                                why: "unknown calibration field".into(),
                            })
                        }
                    }
                }
            }
            _ => {
                return Err(PlanError::BadField {
                    source: source.into(),
                    field: k.clone(),
                    why: "unknown field".into(),
                })
            }
        }
    }
    if !seen_domain && hw.scaleup_domain < hw.gpus_per_node {
        hw.scaleup_domain = hw.gpus_per_node;
    }
    if is_new {
        for (field, v) in [
            ("bf16_dense_tflops", hw.bf16_tflops),
            ("hbm_gb", hw.hbm_gib),
            ("hbm_gbps", hw.hbm_gbps),
            ("scaleup_gbps_per_gpu", hw.scaleup_gbps_bidir),
            ("nic_gbps_per_gpu", hw.nic_gbit),
        ] {
            if v == 0.0 {
                return Err(PlanError::MissingField { source: source.into(), field: field.into() });
            }
        }
    }
    if hw.gpus_per_node == 0 {
        return Err(PlanError::BadField {
            source: source.into(),
            field: "gpus_per_node".into(),
            why: "must be positive".into(),
        });
    }
    Ok(hw)
}
