//! Each job's chart history: rank 0's figures over the whole run in bounded memory.

use crate::*;

/// Points of a job's history kept (48 bytes each in memory, about 50 in the job's row).
pub const SERIES_POINTS: usize = 360;
/// The first sampling period of a job's history.
const SERIES_FIRST_EVERY_MS: u64 = 1000;

/// Rank 0's figures over a whole run in bounded memory: a sample every `every_ms`; when
/// [`SERIES_POINTS`] are held, every other one goes and the period doubles. A week-long run keeps
/// its whole shape, at coarser resolution, in the same 17 KB as a minute-long one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub every_ms: u64,
    /// (time_ms, step, [loss, tokens/s, MFU, ETTR]); None where rank 0 reported nothing.
    points: Vec<(u64, u64, [Option<f32>; 4])>,
}

impl Default for History {
    fn default() -> Self {
        History { every_ms: SERIES_FIRST_EVERY_MS, points: Vec::new() }
    }
}

impl History {
    /// Returns whether the sample was kept.
    pub(crate) fn record(&mut self, time_ms: u64, step: u64, figures: [Option<f64>; 4]) -> bool {
        if let Some(&(last_ms, last_step, _)) = self.points.last() {
            if step == last_step || time_ms < last_ms + self.every_ms {
                return false;
            }
        }
        if self.points.len() == SERIES_POINTS {
            let mut i = 0;
            self.points.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            self.every_ms *= 2;
        }
        self.points.push((time_ms, step, figures.map(|f| f.map(|v| v as f32))));
        true
    }

    pub fn points(&self) -> impl Iterator<Item = SeriesPoint> + '_ {
        let wide = |v: Option<f32>| v.map(f64::from);
        self.points.iter().map(move |&(time_ms, step, [loss, tokens, mfu, ettr])| SeriesPoint {
            time_ms,
            step,
            loss: wide(loss),
            tokens_per_s: wide(tokens),
            mfu: wide(mfu),
            ettr: wide(ettr),
        })
    }
}
