//! The layout search: every (tp, cp, pp, vp, dp, ep, micro-batch, ZeRO, recompute) that keeps the
//! rules, pruned (the least recomputation that fits; SP whenever tp > 1), ranked by MFU.

use crate::error::{PlanError, Result};
use crate::hardware::Hardware;
use crate::layout::{Job, Layout, Software};
use crate::memory::{memory, GIB};
use crate::model::Recompute;
use crate::perf::{predict, Prediction};

pub const MICRO_BATCHES: [u64; 10] = [1, 2, 3, 4, 6, 8, 12, 14, 16, 32];
/// The virtual pipeline stages (interleaving) the search tries.
pub const VIRTUAL: [u64; 6] = [1, 2, 3, 4, 6, 8];
const CONTEXT: [u64; 5] = [1, 2, 4, 8, 16];
/// The search keeps the optimizer step's batch within this fraction of the one asked for: rounding
/// to whole micro-batches per data-parallel rank moves it, and a much larger batch is a different
/// training run, not a faster layout.
pub const MAX_BATCH_DEVIATION: f64 = 0.10;

/// Largest tensor-parallel degree tried (TPU pods would allow more; nobody trains that way).
const MAX_TP: u64 = 64;

fn divisors(n: u64) -> Vec<u64> {
    let mut d: Vec<u64> = (1..=n.isqrt()).filter(|i| n.is_multiple_of(*i)).flat_map(|i| [i, n / i]).collect();
    d.sort_unstable();
    d.dedup();
    d
}

/// The `top` best fitting layouts, best first. Errors name why none exists.
pub fn search(job: &Job, hw: &Hardware, sw: &Software, top: usize) -> Result<Vec<Prediction>> {
    let m = &job.model;
    if job.gpus == 0 {
        return Err(PlanError::NoLayout { gpus: 0, why: "gpus >= 1".into() });
    }
    let tp_limit = if sw.tp_across_nodes { MAX_TP } else { hw.scaleup_domain.min(MAX_TP) };
    let mut best: Vec<Prediction> = Vec::new();
    let mut any_valid = false;
    let mut least_mem = f64::INFINITY;
    let mut first_err: Option<PlanError> = None;
    let mut batch_miss = false;
    for tp in divisors(m.heads).into_iter().filter(|t| *t <= tp_limit) {
        for cp in CONTEXT {
            if !job.gpus.is_multiple_of(tp * cp) {
                continue;
            }
            let rest = job.gpus / (tp * cp);
            for pp in divisors(rest).into_iter().filter(|p| *p <= m.layers) {
                let dp = rest / pp;
                let eps: Vec<u64> = match &m.moe {
                    None => vec![1],
                    Some(moe) => {
                        divisors(moe.experts).into_iter().filter(|e| (dp * cp).is_multiple_of(*e)).collect()
                    }
                };
                for vp in VIRTUAL {
                    if vp > 1
                        && (pp == 1
                            || pp * vp > m.layers
                            || !(sw.uneven_pipeline || m.layers.is_multiple_of(pp * vp)))
                    {
                        continue;
                    }
                    for &ep in &eps {
                        for mb in MICRO_BATCHES {
                            for zero in 0..=3u8 {
                                for recompute in [Recompute::None, Recompute::Selective, Recompute::Full] {
                                    let l = Layout {
                                        tp,
                                        pp,
                                        vp,
                                        dp,
                                        cp,
                                        ep,
                                        micro_batch: mb,
                                        zero,
                                        recompute,
                                        sp: tp > 1,
                                    };
                                    if let Err(e) = l.check(job, hw, sw) {
                                        first_err.get_or_insert(e);
                                        continue;
                                    }
                                    let actual = (l.microbatches(job.global_batch_seqs) * mb * dp) as f64;
                                    let target = job.global_batch_seqs.max(1) as f64;
                                    if (actual - target).abs() > MAX_BATCH_DEVIATION * target {
                                        batch_miss = true;
                                        break;
                                    }
                                    any_valid = true;
                                    let need = memory(job, &l, sw).total();
                                    least_mem = least_mem.min(need);
                                    if need > hw.hbm_gib * GIB {
                                        continue;
                                    }
                                    insert(&mut best, predict(job, hw, &l, sw), top);
                                    // Less recomputation is never slower: stop at the first that fits.
                                    break;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    if best.is_empty() {
        let why = if !any_valid && batch_miss {
            format!(
                "global batch within {:.0}% of {} sequences: no data-parallel degree × micro-batch reaches it",
                100.0 * MAX_BATCH_DEVIATION,
                job.global_batch_seqs
            )
        } else if !any_valid {
            match first_err {
                Some(e) => format!("every split breaks a rule, e.g. {e}"),
                None => {
                    format!("no tp × cp × pp divides {} GPUs within the model's heads and layers", job.gpus)
                }
            }
        } else {
            format!(
                "memory per GPU <= {:.0} GiB: the leanest layout needs {:.1} GiB",
                hw.hbm_gib,
                least_mem / GIB
            )
        };
        return Err(PlanError::NoLayout { gpus: job.gpus, why });
    }
    Ok(best)
}

/// Keeps `best` sorted by MFU, ties (layouts differing only in what they shard) by less memory.
fn insert(best: &mut Vec<Prediction>, p: Prediction, top: usize) {
    let pos = best.partition_point(|q| q.mfu > p.mfu || (q.mfu == p.mfu && q.memory_gib <= p.memory_gib));
    if pos < top.max(1) {
        best.insert(pos, p);
        best.truncate(top.max(1));
    }
}
