//! Measures this machine's FP32 FMA peak: every core runs independent chains of fused
//! multiply-adds on registers (no memory traffic) at the widest vector width the CPU has.
//! MFU divides by this figure, so it must be the real ceiling, not a data-sheet guess.

use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug, Serialize)]
pub struct Peak {
    /// FP32 GFLOP/s over all threads at the widest supported width.
    pub gflops: f64,
    /// The instruction set that reached `gflops`.
    pub isa: &'static str,
    pub threads: usize,
    /// The same measurement restricted to 256-bit AVX2 FMA (None where unsupported).
    pub gflops_avx2: Option<f64>,
}

/// Runs `threads` copies of `kernel(iters)` at once and returns GFLOP/s of the best of `repeats`.
fn measure(threads: usize, repeats: usize, iters: u64, flops_per_iter: f64, kernel: fn(u64) -> f32) -> f64 {
    let mut best = 0f64;
    for _ in 0..repeats {
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| std::hint::black_box(kernel(iters)));
            }
        });
        let secs = start.elapsed().as_secs_f64();
        best = best.max(threads as f64 * iters as f64 * flops_per_iter / secs / 1e9);
    }
    best
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 16 independent chains: enough to cover 4-cycle FMA latency on two ports.
    #[target_feature(enable = "avx512f")]
    unsafe fn fma512(iters: u64) -> f32 {
        let mut acc = [_mm512_set1_ps(0.0); 16];
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm512_set1_ps(i as f32 * 1e-3);
        }
        let m = _mm512_set1_ps(0.999_999);
        let c = _mm512_set1_ps(1e-6);
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, m, c);
            }
        }
        let mut sum = _mm512_set1_ps(0.0);
        for a in acc {
            sum = _mm512_add_ps(sum, a);
        }
        _mm512_reduce_add_ps(sum)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma256(iters: u64) -> f32 {
        let mut acc = [_mm256_set1_ps(0.0); 16];
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm256_set1_ps(i as f32 * 1e-3);
        }
        let m = _mm256_set1_ps(0.999_999);
        let c = _mm256_set1_ps(1e-6);
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, m, c);
            }
        }
        let mut out = [0f32; 8];
        let mut sum = _mm256_set1_ps(0.0);
        for a in acc {
            sum = _mm256_add_ps(sum, a);
        }
        _mm256_storeu_ps(out.as_mut_ptr(), sum);
        out.iter().sum()
    }

    pub fn avx512(iters: u64) -> f32 {
        // SAFETY: only called after runtime detection of avx512f.
        unsafe { fma512(iters) }
    }
    pub fn avx2(iters: u64) -> f32 {
        // SAFETY: only called after runtime detection of avx2 and fma.
        unsafe { fma256(iters) }
    }
}

/// A scalar fallback so the measurement exists everywhere (compilers vectorise none of it).
fn fma_scalar(iters: u64) -> f32 {
    let mut acc = [0f32; 16];
    for (i, a) in acc.iter_mut().enumerate() {
        *a = i as f32 * 1e-3;
    }
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = std::hint::black_box(a.mul_add(0.999_999, 1e-6));
        }
    }
    acc.iter().sum()
}

/// Measures the peak with `threads` threads; `budget_ms` bounds each repeat's duration roughly.
pub fn measure_peak(threads: usize, budget_ms: u64) -> Peak {
    let threads = threads.max(1);
    let repeats = 3;
    // Calibrated for ~4 GHz: iterations of 16 FMAs take about 8 cycles on two FMA ports.
    let iters = budget_ms * 4_000_000 / 8;
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
            .then(|| measure(threads, repeats, iters, 16.0 * 8.0 * 2.0, x86::avx2));
        if is_x86_feature_detected!("avx512f") {
            let g = measure(threads, repeats, iters, 16.0 * 16.0 * 2.0, x86::avx512);
            return Peak { gflops: g, isa: "avx512f", threads, gflops_avx2: avx2 };
        }
        if let Some(g) = avx2 {
            return Peak { gflops: g, isa: "avx2+fma", threads, gflops_avx2: Some(g) };
        }
    }
    let g = measure(threads, repeats, iters / 8, 16.0 * 2.0, fma_scalar);
    Peak { gflops: g, isa: "scalar", threads, gflops_avx2: None }
}
