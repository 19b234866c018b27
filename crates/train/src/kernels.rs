//! Forward and backward kernels of every layer, over flat row-major buffers (llm.c style).
//! Each fast kernel here has a naive reference in `reference` that tests compare it against, and
//! the model's backward is checked against finite differences.
//!
//! Determinism: every reduction is split into chunks whose size does not depend on the thread
//! count, and partial results are combined in a fixed order, so the same inputs give the same bits
//! on every run. Elementwise and per-row work is parallel over rows with rayon.

use rayon::prelude::*;

/// Rows handled per task in row-wise kernels; also the chunk of deterministic reductions.
const ROWS_PER_TASK: usize = 16;
/// Elements per task in elementwise kernels.
const ELEMS_PER_TASK: usize = 1 << 14;
pub const LN_EPS: f32 = 1e-5;

// ---------------------------------------------------------------------------------------------
// Vectorisable math. Branch-free so LLVM turns the loops that call them into SIMD code.

/// e^x with relative error below 2e-7 on [-87, 88]; saturates outside. Cody-Waite reduction to
/// r in [-ln2/2, ln2/2] and a degree-7 Taylor polynomial. Rounding uses the 1.5·2^23 trick and the
/// exponent is built with integer bit operations, so there is no saturating float→int cast and
/// loops calling this vectorise cleanly.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer in the low bits
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // The low mantissa bits of `shifted` hold n in two's complement; move n + 127 into the
    // exponent field (the shift discards everything above it).
    let scale = f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
    p * scale
}

/// Independent accumulators per reduction: lets LLVM keep a vector of partial results (and keeps
/// the combination order fixed, so results stay deterministic).
const LANES: usize = 16;

#[inline(always)]
fn fold_lanes(acc: [f32; LANES], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut a = acc;
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            a[i] = f(a[i], a[i + w]);
        }
        w /= 2;
    }
    a[0]
}

#[inline(always)]
pub fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for ch in chunks {
        for i in 0..LANES {
            acc[i] = if ch[i] > acc[i] { ch[i] } else { acc[i] };
        }
    }
    for (i, &v) in rest.iter().enumerate() {
        acc[i] = if v > acc[i] { v } else { acc[i] };
    }
    fold_lanes(acc, |a, b| if a > b { a } else { b })
}

#[inline(always)]
pub fn sum_of(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for ch in chunks {
        for i in 0..LANES {
            acc[i] += ch[i];
        }
    }
    for (i, &v) in rest.iter().enumerate() {
        acc[i] += v;
    }
    fold_lanes(acc, |a, b| a + b)
}

#[inline(always)]
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
    debug_assert_eq!(x.len(), y.len());
    let mut acc = [0f32; LANES];
    let (cx, cy) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let (rx, ry) = (cx.remainder(), cy.remainder());
    for (a, b) in cx.zip(cy) {
        for i in 0..LANES {
            acc[i] += a[i] * b[i];
        }
    }
    for (i, (a, b)) in rx.iter().zip(ry).enumerate() {
        acc[i] += a * b;
    }
    fold_lanes(acc, |a, b| a + b)
}

/// x[i] = exp(x[i] - shift) in place; returns the sum of the results.
#[inline(always)]
pub fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for ch in &mut chunks {
        for i in 0..LANES {
            ch[i] = fast_exp(ch[i] - shift);
            acc[i] += ch[i];
        }
    }
    for (i, v) in chunks.into_remainder().iter_mut().enumerate() {
        *v = fast_exp(*v - shift);
        acc[i] += *v;
    }
    fold_lanes(acc, |a, b| a + b)
}

#[inline(always)]
pub fn fast_tanh(x: f32) -> f32 {
    let t = fast_exp(-2.0 * x.abs());
    ((1.0 - t) / (1.0 + t)).copysign(x)
}

const GELU_SCALE: f32 = 0.797_884_6; // sqrt(2 / pi)
const GELU_CUBIC: f32 = 0.044715;

// ---------------------------------------------------------------------------------------------
// GEMM.

fn parallelism(parallel: bool) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// A strided view for [`gemm_raw`]: element (i, j) is at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub struct View {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// C(m,n) = [C +] alpha · A(m,k) B(k,n) on strided views. `accumulate` reads C first.
///
/// # Safety
/// Every view must cover its whole (rows × cols) extent within one live allocation, and C must
/// not alias A or B.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: isize,
    a: View,
    b: View,
    alpha: f32,
    accumulate: bool,
    parallel: bool,
) {
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        c_rs,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        1.0,
        alpha,
        false,
        false,
        false,
        parallelism(parallel),
    );
}

/// C(m,n) [+]= A(m,k) · B(k,n) on contiguous row-major buffers, multi-threaded.
/// `a_t`: A is stored transposed, as (k, m). `b_t`: B is stored transposed, as (n, k).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    assert_eq!(c.len(), m * n, "matmul: C is not {m}x{n}");
    assert_eq!(a.len(), m * k, "matmul: A is not {m}x{k}");
    assert_eq!(b.len(), k * n, "matmul: B is not {k}x{n}");
    let av = if a_t {
        View { ptr: a.as_ptr(), rs: 1, cs: m as isize }
    } else {
        View { ptr: a.as_ptr(), rs: k as isize, cs: 1 }
    };
    let bv = if b_t {
        View { ptr: b.as_ptr(), rs: 1, cs: k as isize }
    } else {
        View { ptr: b.as_ptr(), rs: n as isize, cs: 1 }
    };
    // SAFETY: the asserts above bound every view to its slice; `c` is a distinct &mut.
    unsafe { gemm_raw(m, n, k, c.as_mut_ptr(), n as isize, av, bv, 1.0, accumulate, true) }
}

/// out(rows, cols) = base(rows, cols) + bias(cols) broadcast over rows; `base` None means zero.
/// Used to seed a GEMM's output with its bias (and the residual it adds onto).
pub fn seed_rows(out: &mut [f32], base: Option<&[f32]>, bias: &[f32]) {
    let cols = bias.len();
    assert_eq!(out.len() % cols, 0);
    out.par_chunks_mut(cols * ROWS_PER_TASK).enumerate().for_each(|(task, chunk)| {
        for (r, row) in chunk.chunks_exact_mut(cols).enumerate() {
            match base {
                Some(base) => {
                    let start = (task * ROWS_PER_TASK + r) * cols;
                    let src = &base[start..start + cols];
                    for ((o, s), b) in row.iter_mut().zip(src).zip(bias) {
                        *o = s + b;
                    }
                }
                None => row.copy_from_slice(bias),
            }
        }
    });
}

/// dbias(cols) += column sums of dout(rows, cols). Parallel over column blocks; each column is
/// summed over rows in order, so the result does not depend on the thread count.
pub fn bias_backward(dbias: &mut [f32], dout: &[f32]) {
    const COLS_PER_TASK: usize = 64;
    let cols = dbias.len();
    assert_eq!(dout.len() % cols, 0);
    dbias.par_chunks_mut(COLS_PER_TASK).enumerate().for_each(|(task, db)| {
        let c0 = task * COLS_PER_TASK;
        let mut acc = [0f32; COLS_PER_TASK];
        let acc = &mut acc[..db.len()];
        for row in dout.chunks_exact(cols) {
            for (a, x) in acc.iter_mut().zip(&row[c0..c0 + db.len()]) {
                *a += x;
            }
        }
        for (d, a) in db.iter_mut().zip(acc.iter()) {
            *d += a;
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Embeddings.

/// out(B*T, C) = wte[tokens] + wpe[position].
pub fn encoder_forward(out: &mut [f32], tokens: &[u32], wte: &[f32], wpe: &[f32], t: usize, c: usize) {
    out.par_chunks_mut(c).zip(tokens.par_iter()).enumerate().for_each(|(bt, (row, &tok))| {
        let pos = bt % t;
        let e = &wte[tok as usize * c..][..c];
        let p = &wpe[pos * c..][..c];
        for ((o, a), b) in row.iter_mut().zip(e).zip(p) {
            *o = a + b;
        }
    });
}

/// dwte[tokens] += dout, dwpe[position] += dout. Parallel over column blocks so repeated tokens
/// are accumulated in row order by one task: deterministic.
pub fn encoder_backward(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dout: &[f32],
    tokens: &[u32],
    t: usize,
    c: usize,
) {
    const COLS_PER_TASK: usize = 64;
    let blocks = c.div_ceil(COLS_PER_TASK);
    let wte_ptr = SendPtr(dwte.as_mut_ptr());
    let wpe_ptr = SendPtr(dwpe.as_mut_ptr());
    let (wte_len, wpe_len) = (dwte.len(), dwpe.len());
    (0..blocks).into_par_iter().for_each(|blk| {
        let c0 = blk * COLS_PER_TASK;
        let c1 = (c0 + COLS_PER_TASK).min(c);
        for (bt, &tok) in tokens.iter().enumerate() {
            let src = &dout[bt * c + c0..bt * c + c1];
            let (we, pe) = (tok as usize * c + c0, (bt % t) * c + c0);
            assert!(we + src.len() <= wte_len && pe + src.len() <= wpe_len);
            // SAFETY: tasks own disjoint column blocks [c0, c1) of every row; bounds asserted.
            unsafe {
                let we = std::slice::from_raw_parts_mut(wte_ptr.get().add(we), src.len());
                let pe = std::slice::from_raw_parts_mut(wpe_ptr.get().add(pe), src.len());
                for ((a, b), s) in we.iter_mut().zip(pe.iter_mut()).zip(src) {
                    *a += s;
                    *b += s;
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// LayerNorm.

/// out = (x - mean) * rstd * w + b per row of x(rows, C); saves mean and rstd for backward.
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: &[f32],
) {
    let c = w.len();
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((o, xr), (m, rs))| {
            let mu = sum_of(xr) / c as f32;
            let mut sq = [0f32; LANES];
            for (i, v) in xr.iter().enumerate() {
                sq[i % LANES] += (v - mu) * (v - mu);
            }
            let var = fold_lanes(sq, |a, b| a + b) / c as f32;
            let r = 1.0 / (var + LN_EPS).sqrt();
            for (((o, v), w), b) in o.iter_mut().zip(xr).zip(w).zip(b) {
                *o = (v - mu) * r * w + b;
            }
            *m = mu;
            *rs = r;
        });
}

/// dx += LayerNorm backward; dw, db += their row sums. dx is accumulated because LayerNorm sits
/// on the residual stream, whose gradient arrives from two branches.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
) {
    let c = w.len();
    let rows = mean.len();
    let tasks = rows.div_ceil(ROWS_PER_TASK);
    // Per-task partial sums of dw and db, combined in task order below.
    let mut partial = vec![0f32; tasks * 2 * c];
    partial.par_chunks_mut(2 * c).zip(dx.par_chunks_mut(c * ROWS_PER_TASK)).enumerate().for_each(
        |(task, (part, dxs))| {
            let (pw, pb) = part.split_at_mut(c);
            for (r, dxr) in dxs.chunks_exact_mut(c).enumerate() {
                let row = task * ROWS_PER_TASK + r;
                let (xr, dor) = (&x[row * c..][..c], &dout[row * c..][..c]);
                let (mu, rs) = (mean[row], rstd[row]);
                let mut acc_d = [0f32; LANES];
                let mut acc_dn = [0f32; LANES];
                for i in 0..c {
                    let norm = (xr[i] - mu) * rs;
                    let dnorm = dor[i] * w[i];
                    acc_d[i % LANES] += dnorm;
                    acc_dn[i % LANES] += dnorm * norm;
                }
                let dnorm_mean = fold_lanes(acc_d, |a, b| a + b) / c as f32;
                let dnorm_norm_mean = fold_lanes(acc_dn, |a, b| a + b) / c as f32;
                for i in 0..c {
                    let norm = (xr[i] - mu) * rs;
                    let dnorm = dor[i] * w[i];
                    dxr[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * rs;
                    pw[i] += dor[i] * norm;
                    pb[i] += dor[i];
                }
            }
        },
    );
    for part in partial.chunks_exact(2 * c) {
        for i in 0..c {
            dw[i] += part[i];
            db[i] += part[c + i];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GELU (tanh approximation, as GPT-2).

pub fn gelu_forward(out: &mut [f32], x: &[f32]) {
    out.par_chunks_mut(ELEMS_PER_TASK).zip(x.par_chunks(ELEMS_PER_TASK)).for_each(|(o, x)| {
        for (o, &v) in o.iter_mut().zip(x) {
            let u = GELU_SCALE * (v + GELU_CUBIC * v * v * v);
            *o = 0.5 * v * (1.0 + fast_tanh(u));
        }
    });
}

/// dx = dout * gelu'(x), written over `dout` in place (the caller no longer needs dout).
pub fn gelu_backward_inplace(dout_dx: &mut [f32], x: &[f32]) {
    dout_dx.par_chunks_mut(ELEMS_PER_TASK).zip(x.par_chunks(ELEMS_PER_TASK)).for_each(|(d, x)| {
        for (d, &v) in d.iter_mut().zip(x) {
            let u = GELU_SCALE * (v + GELU_CUBIC * v * v * v);
            let th = fast_tanh(u);
            let sech2 = 1.0 - th * th;
            let grad = 0.5 * (1.0 + th) + 0.5 * v * sech2 * GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * v * v);
            *d *= grad;
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Causal multi-head self-attention.

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint regions of one buffer to parallel tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub c: usize,
    pub nh: usize,
}

/// Query rows per causal block: a block of rows only multiplies the keys at or before its last
/// row, which skips most of the masked upper triangle (5/8 of the work of full T×T at T = 4 blocks).
const ATT_BLOCK: usize = 64;

/// qkv(B,T,3C) → y(B,T,C); att(B,NH,T,T) keeps the softmax probabilities for backward
/// (zero above the diagonal). One task per (batch, head), each running small GEMMs.
pub fn attention_forward(y: &mut [f32], att: &mut [f32], qkv: &[f32], s: AttnShape) {
    let AttnShape { b, t, c, nh } = s;
    let hs = c / nh;
    assert_eq!(qkv.len(), b * t * 3 * c);
    assert_eq!(y.len(), b * t * c);
    assert_eq!(att.len(), b * nh * t * t);
    let scale = 1.0 / (hs as f32).sqrt();
    let (c3, ci, ti) = (3 * c as isize, c as isize, t as isize);
    let yp = SendPtr(y.as_mut_ptr());
    att.par_chunks_mut(t * t).enumerate().for_each(|(bh, p)| {
        let (bi, h) = (bh / nh, bh % nh);
        let base = qkv[bi * t * 3 * c..].as_ptr();
        // SAFETY: q, k, v views stay inside this batch row's (T, 3C) block, and rows [r0, r1)
        // of P and of y's head block are written by this task only.
        unsafe {
            let yh = yp.get().add(bi * t * c + h * hs);
            let kt = View { ptr: base.add(c + h * hs), rs: 1, cs: c3 };
            let v = View { ptr: base.add(2 * c + h * hs), rs: c3, cs: 1 };
            for r0 in (0..t).step_by(ATT_BLOCK) {
                let r1 = (r0 + ATT_BLOCK).min(t);
                let rows = r1 - r0;
                let q = View { ptr: base.add(r0 * 3 * c + h * hs), rs: c3, cs: 1 };
                let pb = p.as_mut_ptr().add(r0 * t);
                gemm_raw(rows, r1, hs, pb, ti, q, kt, scale, false, false);
                causal_softmax_rows(&mut p[r0 * t..r1 * t], t, r0);
                let pv = View { ptr: p.as_ptr().add(r0 * t), rs: ti, cs: 1 };
                gemm_raw(rows, hs, r1, yh.add(r0 * c), ci, pv, v, 1.0, false, false);
            }
        }
    });
}

/// Rows of P starting at row `first`: row i keeps columns 0..=i (softmax over them), zeros after.
fn causal_softmax_rows(p: &mut [f32], t: usize, first: usize) {
    for (r, row) in p.chunks_exact_mut(t).enumerate() {
        let (live, masked) = row.split_at_mut(first + r + 1);
        let max = max_of(live);
        let inv = 1.0 / exp_shifted_sum(live, max);
        for v in live.iter_mut() {
            *v *= inv;
        }
        masked.fill(0.0);
    }
}

/// dqkv(B,T,3C) = attention backward of dy(B,T,C), given the forward's qkv and probabilities.
pub fn attention_backward(dqkv: &mut [f32], dy: &[f32], qkv: &[f32], att: &[f32], s: AttnShape) {
    let AttnShape { b, t, c, nh } = s;
    let hs = c / nh;
    assert_eq!(dqkv.len(), b * t * 3 * c);
    assert_eq!(dy.len(), b * t * c);
    assert_eq!(att.len(), b * nh * t * t);
    let scale = 1.0 / (hs as f32).sqrt();
    let (c3, ci, ti) = (3 * c as isize, c as isize, t as isize);
    let dp = SendPtr(dqkv.as_mut_ptr());
    att.par_chunks(t * t).enumerate().for_each_init(
        || vec![0f32; t * t],
        |ds, (bh, p)| {
            let (bi, h) = (bh / nh, bh % nh);
            let base = qkv[bi * t * 3 * c..].as_ptr();
            let dyh = dy[bi * t * c + h * hs..].as_ptr();
            // SAFETY: all views stay inside this batch row's blocks; the (T, hs) blocks of dq,
            // dk, dv for head h are written by this task only. P and dS are zero above the
            // diagonal, so the blocks below only skip products that are exactly zero.
            unsafe {
                let dbase = dp.get().add(bi * t * 3 * c + h * hs);
                let vt = View { ptr: base.add(2 * c + h * hs), rs: 1, cs: c3 };
                let k = View { ptr: base.add(c + h * hs), rs: c3, cs: 1 };
                // Per query block: dP = dy V^T, softmax backward into dS, dq = dS K.
                for r0 in (0..t).step_by(ATT_BLOCK) {
                    let r1 = (r0 + ATT_BLOCK).min(t);
                    let rows = r1 - r0;
                    let dyv = View { ptr: dyh.add(r0 * c), rs: ci, cs: 1 };
                    gemm_raw(rows, r1, hs, ds.as_mut_ptr().add(r0 * t), ti, dyv, vt, 1.0, false, false);
                    for i in r0..r1 {
                        let (dsr, pr) = (&mut ds[i * t..(i + 1) * t], &p[i * t..(i + 1) * t]);
                        let live = i + 1;
                        let dot = dot(&dsr[..live], &pr[..live]);
                        for (d, &pv) in dsr[..live].iter_mut().zip(&pr[..live]) {
                            *d = pv * (*d - dot) * scale;
                        }
                        dsr[live..].fill(0.0);
                    }
                    let dsv = View { ptr: ds.as_ptr().add(r0 * t), rs: ti, cs: 1 };
                    gemm_raw(rows, hs, r1, dbase.add(r0 * 3 * c), c3, dsv, k, 1.0, false, false);
                }
                // Per key block j0..j1: only query rows i >= j0 attend to it.
                // dk = dS^T q and dv = P^T dy over those rows.
                for j0 in (0..t).step_by(ATT_BLOCK) {
                    let j1 = (j0 + ATT_BLOCK).min(t);
                    let (cols, rows) = (j1 - j0, t - j0);
                    let dst = View { ptr: ds.as_ptr().add(j0 * t + j0), rs: 1, cs: ti };
                    let q = View { ptr: base.add(j0 * 3 * c + h * hs), rs: c3, cs: 1 };
                    gemm_raw(cols, hs, rows, dbase.add(j0 * 3 * c + c), c3, dst, q, 1.0, false, false);
                    let pt = View { ptr: p.as_ptr().add(j0 * t + j0), rs: 1, cs: ti };
                    let dyv = View { ptr: dyh.add(j0 * c), rs: ci, cs: 1 };
                    gemm_raw(cols, hs, rows, dbase.add(j0 * 3 * c + 2 * c), c3, pt, dyv, 1.0, false, false);
                }
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Softmax + cross-entropy, fused with its backward.

/// For each row of logits(rows, Vp): loss = -log softmax(logits[..V])[target]. Then overwrites
/// the row with d(loss * dloss)/dlogits (padded columns get 0). Returns per-row losses in `losses`.
pub fn softmax_xent_fused(
    logits: &mut [f32],
    losses: &mut [f32],
    targets: &[u32],
    v: usize,
    vp: usize,
    dloss: f32,
) {
    assert_eq!(logits.len(), targets.len() * vp);
    logits.par_chunks_mut(vp).zip(losses.par_iter_mut()).zip(targets.par_iter()).with_min_len(4).for_each(
        |((row, loss), &tgt)| {
            let tgt = tgt as usize;
            let (live, pad) = row.split_at_mut(v);
            let max = max_of(live);
            let target_logit = live[tgt];
            let sum = exp_shifted_sum(live, max);
            *loss = sum.ln() + max - target_logit;
            let k = dloss / sum;
            for x in live.iter_mut() {
                *x *= k;
            }
            live[tgt] -= dloss;
            pad.fill(0.0);
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Elementwise helpers shared by the model and optimizer.

/// Sum of squares in f64, over fixed-size chunks combined in order: deterministic.
pub fn sum_squares(x: &[f32]) -> f64 {
    let partial: Vec<f64> = x
        .par_chunks(ELEMS_PER_TASK)
        .map(|ch| {
            let mut acc = [0f64; 8];
            let lanes = ch.chunks_exact(8);
            for (i, &v) in lanes.remainder().iter().enumerate() {
                acc[i] += (v as f64) * (v as f64);
            }
            for l in lanes {
                for i in 0..8 {
                    acc[i] += (l[i] as f64) * (l[i] as f64);
                }
            }
            acc.iter().sum::<f64>()
        })
        .collect();
    partial.iter().sum()
}

pub mod reference {
    //! Naive kernels: the slow, obviously-correct versions the fast ones are tested against.

    pub fn matmul(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    pub fn attention(qkv: &[f32], b: usize, t: usize, c: usize, nh: usize) -> Vec<f32> {
        let hs = c / nh;
        let scale = 1.0 / (hs as f64).sqrt();
        let mut y = vec![0f32; b * t * c];
        for bi in 0..b {
            for h in 0..nh {
                for i in 0..t {
                    let q = &qkv[(bi * t + i) * 3 * c + h * hs..][..hs];
                    let mut w = vec![0f64; i + 1];
                    for (j, wj) in w.iter_mut().enumerate() {
                        let k = &qkv[(bi * t + j) * 3 * c + c + h * hs..][..hs];
                        *wj = q.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale;
                    }
                    let max = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = w.iter().map(|x| (x - max).exp()).sum();
                    for d in 0..hs {
                        let mut acc = 0f64;
                        for (j, wj) in w.iter().enumerate() {
                            acc += (wj - max).exp() / sum
                                * qkv[(bi * t + j) * 3 * c + 2 * c + h * hs + d] as f64;
                        }
                        y[(bi * t + i) * c + h * hs + d] = acc as f32;
                    }
                }
            }
        }
        y
    }

    pub fn gelu(x: f32) -> f32 {
        let x = x as f64;
        let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
        (0.5 * x * (1.0 + u.tanh())) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn randn(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.normal() as f32).collect()
    }

    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    #[test]
    fn fast_exp_and_tanh_match_std() {
        let mut worst = 0f32;
        for i in -8000..8000 {
            let x = i as f32 * 0.01;
            let rel = ((fast_exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            assert!((fast_tanh(x) - x.tanh()).abs() < 1e-6, "tanh({x})");
        }
        assert!(worst < 5e-7, "fast_exp worst relative error {worst}");
        assert_eq!(fast_exp(-1000.0), fast_exp(-87.0));
    }

    #[test]
    fn matmul_matches_reference_in_all_transpositions() {
        let (m, n, k) = (37, 29, 53);
        let a = randn(m * k, 1);
        let b = randn(k * n, 2);
        let want = reference::matmul(&a, &b, m, n, k);
        let transpose = |x: &[f32], r: usize, c: usize| {
            let mut t = vec![0f32; r * c];
            for i in 0..r {
                for j in 0..c {
                    t[j * r + i] = x[i * c + j];
                }
            }
            t
        };
        let (at, bt) = (transpose(&a, m, k), transpose(&b, k, n));
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut c = vec![0f32; m * n];
            let aa = if a_t { &at } else { &a };
            let bb = if b_t { &bt } else { &b };
            matmul(&mut c, aa, a_t, bb, b_t, m, n, k, false);
            assert!(max_rel_diff(&c, &want) < 1e-5, "a_t={a_t} b_t={b_t}");
            // accumulate adds onto what is there
            matmul(&mut c, aa, a_t, bb, b_t, m, n, k, true);
            let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
            assert!(max_rel_diff(&c, &twice) < 1e-5);
        }
    }

    #[test]
    fn attention_matches_reference() {
        attention_case(AttnShape { b: 2, t: 7, c: 12, nh: 3 });
        // Several causal blocks, the last one partial.
        attention_case(AttnShape { b: 1, t: 2 * ATT_BLOCK + 5, c: 8, nh: 2 });
    }

    fn attention_case(s: AttnShape) {
        let qkv = randn(s.b * s.t * 3 * s.c, 3);
        let mut y = vec![0f32; s.b * s.t * s.c];
        let mut att = vec![0f32; s.b * s.nh * s.t * s.t];
        attention_forward(&mut y, &mut att, &qkv, s);
        let want = reference::attention(&qkv, s.b, s.t, s.c, s.nh);
        assert!(max_rel_diff(&y, &want) < 1e-5, "{}", max_rel_diff(&y, &want));
        for row in att.chunks_exact(s.t) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }

        // Backward: the directional derivative of L = <y, R> along D, by central differences of
        // the naive f64 forward, equals <dqkv, D>.
        let r = randn(y.len(), 5);
        let d = randn(qkv.len(), 6);
        let mut dqkv = vec![0f32; qkv.len()];
        attention_backward(&mut dqkv, &r, &qkv, &att, s);
        let loss = |x: &[f32]| -> f64 {
            let y = reference::attention(x, s.b, s.t, s.c, s.nh);
            y.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let h = 1e-3f32;
        let shifted =
            |sign: f32| -> Vec<f32> { qkv.iter().zip(&d).map(|(x, dd)| x + sign * h * dd).collect() };
        let fd = (loss(&shifted(1.0)) - loss(&shifted(-1.0))) / (2.0 * h as f64);
        let analytic: f64 = dqkv.iter().zip(&d).map(|(a, b)| *a as f64 * *b as f64).sum();
        let rel = (fd - analytic).abs() / fd.abs().max(analytic.abs());
        assert!(rel < 1e-3, "attention backward {analytic} vs finite differences {fd} (rel {rel:.2e})");
    }

    #[test]
    fn gelu_matches_reference() {
        let x = randn(1000, 4);
        let mut y = vec![0f32; x.len()];
        gelu_forward(&mut y, &x);
        for (a, &v) in y.iter().zip(&x) {
            assert!((a - reference::gelu(v)).abs() < 1e-6);
        }
    }
}
