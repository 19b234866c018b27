//! Times each kernel of one training step at a given shape, to see where a step's time goes.
//! `cargo run --release -p myriad-train --example kernel_profile -- [preset] [batch] [seq]`

use std::time::Instant;
use train::kernels::{self as k, AttnShape};
use train::ModelConfig;

fn time<F: FnMut()>(name: &str, count: usize, flops: f64, mut f: F, total: &mut f64) {
    f(); // warm-up
    let reps = 3;
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    let per_step = best * count as f64;
    *total += per_step;
    let gf = if flops > 0.0 { format!("{:7.1} GFLOP/s", flops / best / 1e9) } else { String::new() };
    println!("{name:28} {:8.2} ms x{count:3} = {:8.1} ms/step {gf}", best * 1e3, per_step * 1e3);
}

fn main() {
    train::memory::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    let cfg = ModelConfig::preset(args.get(1).map_or("gpt2-124m", |s| s)).unwrap();
    let b: usize = args.get(2).map_or(8, |s| s.parse().unwrap());
    let t: usize = args.get(3).map_or(256, |s| s.parse().unwrap());
    let (c, l, vp, nh) = (cfg.n_embd, cfg.n_layer, cfg.padded_vocab_size, cfg.n_head);
    let bt = b * t;
    let z = |n: usize| vec![0.01f32; n];
    let mut total = 0.0;
    let mm = |m: usize, n: usize, kk: usize| 2.0 * (m * n * kk) as f64;
    let (x, w3, mut y3) = (z(bt * c), z(c * 3 * c), z(bt * 3 * c));
    time(
        "fwd qkv",
        l,
        mm(bt, 3 * c, c),
        || k::matmul(&mut y3, &x, false, &w3, false, bt, 3 * c, c, true),
        &mut total,
    );
    let (w, mut y) = (z(c * c), z(bt * c));
    time(
        "fwd attproj",
        l,
        mm(bt, c, c),
        || k::matmul(&mut y, &x, false, &w, false, bt, c, c, true),
        &mut total,
    );
    let (w4, mut y4) = (z(c * 4 * c), z(bt * 4 * c));
    time(
        "fwd fc",
        l,
        mm(bt, 4 * c, c),
        || k::matmul(&mut y4, &x, false, &w4, false, bt, 4 * c, c, true),
        &mut total,
    );
    time(
        "fwd fcproj",
        l,
        mm(bt, c, 4 * c),
        || k::matmul(&mut y, &y4, false, &w4, false, bt, c, 4 * c, true),
        &mut total,
    );
    let (wte, mut logits) = (z(vp * c), z(bt * vp));
    time(
        "fwd lm head",
        1,
        mm(bt, vp, c),
        || k::matmul(&mut logits, &x, false, &wte, true, bt, vp, c, false),
        &mut total,
    );
    time(
        "bwd fcproj dx",
        l,
        mm(bt, 4 * c, c),
        || k::matmul(&mut y4, &y, false, &w4, true, bt, 4 * c, c, false),
        &mut total,
    );
    let mut gw4 = z(4 * c * c);
    time(
        "bwd fcproj dw",
        l,
        mm(4 * c, c, bt),
        || k::matmul(&mut gw4, &y4, true, &y, false, 4 * c, c, bt, true),
        &mut total,
    );
    time(
        "bwd fc dx",
        l,
        mm(bt, c, 4 * c),
        || k::matmul(&mut y, &y4, false, &w4, true, bt, c, 4 * c, false),
        &mut total,
    );
    time(
        "bwd fc dw",
        l,
        mm(c, 4 * c, bt),
        || k::matmul(&mut gw4, &x, true, &y4, false, c, 4 * c, bt, true),
        &mut total,
    );
    let mut gw = z(c * c);
    time(
        "bwd attproj dx",
        l,
        mm(bt, c, c),
        || k::matmul(&mut y, &x, false, &w, true, bt, c, c, false),
        &mut total,
    );
    time(
        "bwd attproj dw",
        l,
        mm(c, c, bt),
        || k::matmul(&mut gw, &x, true, &y, false, c, c, bt, true),
        &mut total,
    );
    time(
        "bwd qkv dx",
        l,
        mm(bt, c, 3 * c),
        || k::matmul(&mut y, &y3, false, &w3, true, bt, c, 3 * c, false),
        &mut total,
    );
    let mut gw3 = z(c * 3 * c);
    time(
        "bwd qkv dw",
        l,
        mm(c, 3 * c, bt),
        || k::matmul(&mut gw3, &x, true, &y3, false, c, 3 * c, bt, true),
        &mut total,
    );
    let mut dx = z(bt * c);
    time(
        "bwd lm head dx",
        1,
        mm(bt, c, vp),
        || k::matmul(&mut dx, &logits, false, &wte, false, bt, c, vp, false),
        &mut total,
    );
    let mut gwte = z(vp * c);
    time(
        "bwd lm head dw",
        1,
        mm(vp, c, bt),
        || k::matmul(&mut gwte, &logits, true, &x, false, vp, c, bt, true),
        &mut total,
    );
    println!("-- GEMM total {:.1} ms", total * 1e3);
    let gemm_total = total;

    let s = AttnShape { b, t, c, nh };
    let qkv: Vec<f32> = (0..bt * 3 * c).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect();
    let mut att = z(b * nh * t * t);
    let attn_flops = 2.0 * 2.0 * (b * nh * t * t * (c / nh)) as f64;
    time("attention fwd", l, attn_flops, || k::attention_forward(&mut y, &mut att, &qkv, s), &mut total);
    let mut dqkv = z(bt * 3 * c);
    time(
        "attention bwd",
        l,
        2.0 * attn_flops,
        || k::attention_backward(&mut dqkv, &x, &qkv, &att, s),
        &mut total,
    );
    let (lw, lb) = (z(c), z(c));
    let (mut mean, mut rstd) = (z(bt), z(bt));
    time(
        "layernorm fwd",
        2 * l + 1,
        0.0,
        || k::layernorm_forward(&mut y, &mut mean, &mut rstd, &x, &lw, &lb),
        &mut total,
    );
    let (mut gw1, mut gb1) = (z(c), z(c));
    time(
        "layernorm bwd",
        2 * l + 1,
        0.0,
        || k::layernorm_backward(&mut dx, &mut gw1, &mut gb1, &y, &x, &lw, &mean, &rstd),
        &mut total,
    );
    let y4c = y4.clone();
    time("gelu fwd", l, 0.0, || k::gelu_forward(&mut y4, &y4c), &mut total);
    time("gelu bwd", l, 0.0, || k::gelu_backward_inplace(&mut y4, &y4c), &mut total);
    let b3 = z(3 * c);
    time("seed bias qkv", l, 0.0, || k::seed_rows(&mut y3, None, &b3), &mut total);
    time("seed bias+res", 2 * l, 0.0, || k::seed_rows(&mut y, Some(&x), &lb), &mut total);
    let b4 = z(4 * c);
    time("seed bias fc", l, 0.0, || k::seed_rows(&mut y4, None, &b4), &mut total);
    let mut gb3 = z(3 * c);
    time("bias bwd qkv", l, 0.0, || k::bias_backward(&mut gb3, &y3), &mut total);
    time("bias bwd c (x2)", 2 * l, 0.0, || k::bias_backward(&mut gb1, &y), &mut total);
    let mut gb4 = z(4 * c);
    time("bias bwd fc", l, 0.0, || k::bias_backward(&mut gb4, &y4), &mut total);
    let targets: Vec<u32> = (0..bt as u32).map(|i| i % cfg.vocab_size as u32).collect();
    let mut losses = z(bt);
    let logits0 = logits.clone();
    time(
        "softmax xent",
        1,
        0.0,
        || {
            logits.copy_from_slice(&logits0);
            k::softmax_xent_fused(&mut logits, &mut losses, &targets, cfg.vocab_size, vp, 1.0)
        },
        &mut total,
    );
    let n = cfg.num_params();
    let grads = z(n);
    time(
        "grad norm",
        1,
        0.0,
        || {
            std::hint::black_box(k::sum_squares(&grads));
        },
        &mut total,
    );
    let specs = train::params::param_specs(&cfg);
    let mut params = z(n);
    let mut opt = train::optim::AdamW::new(n);
    let tc = train::TrainConfig::default();
    time("adamw", 1, 0.0, || opt.update(&mut params, &grads, &specs, &tc, 1e-4, 1.0), &mut total);
    println!(
        "-- non-GEMM {:.1} ms; total {:.1} ms/step; model {:.1} GFLOP/s if nothing else",
        (total - gemm_total) * 1e3,
        total * 1e3,
        cfg.flops_per_token(t) * bt as f64 / total / 1e9
    );
}
