//! `myriad bench`: machine and trainer measurements, each printable as JSON.

use clap::{Args, Subcommand};
use serde_json::json;
use train::data::DataSpec;
use train::{ModelConfig, TrainConfig, Trainer};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// This machine's FP32 FMA peak over all cores.
    Peak(PeakArgs),
    /// Trainer throughput and MFU for one model and batch shape.
    Train(TrainBenchArgs),
    /// Ring all-reduce bandwidth between ranks on this machine, beside raw loopback TCP.
    Allreduce(AllreduceArgs),
    /// The controller under a cluster of simulated agents: heartbeats, job start, node loss.
    ControlPlane(crate::bench_control::ControlPlaneArgs),
}

#[derive(Args)]
pub struct AllreduceArgs {
    /// Ranks (threads of this process, each with its own TCP connections).
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    /// Buffer size in bytes (f32 elements × 4).
    #[arg(long, default_value_t = 64 << 20)]
    bytes: usize,
    /// Timed iterations (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Move data over TCP even between ranks that could share memory.
    #[arg(long)]
    tcp: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PeakArgs {
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct TrainBenchArgs {
    #[arg(long, default_value = "gpt2-124m")]
    preset: String,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Timed steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: u64,
    #[arg(long)]
    threads: Option<usize>,
    /// FP32 peak in GFLOP/s; measured in the same run when absent.
    #[arg(long)]
    peak_gflops: Option<f64>,
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: BenchCommand) -> Result<(), String> {
    match cmd {
        BenchCommand::ControlPlane(a) => crate::bench_control::run(a),
        BenchCommand::Peak(a) => {
            let threads = crate::init_threads(a.threads)?;
            let peak = train::peak::measure_peak(threads, 300);
            if a.json {
                println!("{}", serde_json::to_string(&peak).expect("serialises"));
            } else {
                println!(
                    "FP32 FMA peak: {:.1} GFLOP/s ({}, {} threads)",
                    peak.gflops, peak.isa, peak.threads
                );
                if let Some(g) = peak.gflops_avx2 {
                    println!("  256-bit AVX2 FMA only: {g:.1} GFLOP/s");
                }
            }
            Ok(())
        }
        BenchCommand::Train(a) => bench_train(a),
        BenchCommand::Allreduce(a) => bench_allreduce(a),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// nccl-tests' definitions: algbw = bytes / time; busbw = algbw × 2(n−1)/n for all-reduce.
fn bench_allreduce(a: AllreduceArgs) -> Result<(), String> {
    if a.ranks < 2 || a.ranks > 64 {
        return Err(format!("--ranks {} must be between 2 and 64", a.ranks));
    }
    if a.bytes < 4 || a.iters == 0 {
        return Err("--bytes must be at least 4 and --iters at least 1".into());
    }
    let elems = a.bytes / 4;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let times: Vec<Result<Vec<f64>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..a.ranks)
            .map(|rank| {
                s.spawn(move || -> Result<Vec<f64>, String> {
                    let cfg = comm::GroupConfig {
                        rank,
                        world_size: a.ranks,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        timeout: comm::DEFAULT_TIMEOUT,
                        shm: !a.tcp,
                        secret: None,
                    };
                    let group = comm::ProcessGroup::connect(&cfg).map_err(|e| e.to_string())?;
                    let mut buf = vec![1.0f32; elems];
                    let mut times = Vec::new();
                    for i in 0..=a.iters {
                        group.barrier().map_err(|e| e.to_string())?;
                        let t = std::time::Instant::now();
                        group.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
                        if i > 0 {
                            times.push(t.elapsed().as_secs_f64());
                        }
                    }
                    Ok(times)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    });
    let rank0 = times.into_iter().collect::<Result<Vec<_>, _>>()?.swap_remove(0);
    let secs = median(rank0);
    let bytes = (elems * 4) as f64;
    let algbw = bytes / secs / 1e9;
    let busbw = algbw * 2.0 * (a.ranks - 1) as f64 / a.ranks as f64;
    let loopback = loopback_gbps(a.bytes).map_err(|e| format!("loopback TCP measurement: {e}"))?;
    let out = json!({
        "ranks": a.ranks, "bytes": elems * 4, "transport": if a.tcp { "tcp" } else { "shm" }, "time_ms_median": secs * 1e3,
        "algbw_gbps": algbw, "busbw_gbps": busbw, "loopback_tcp_gbps": loopback,
        "busbw_vs_loopback": busbw / loopback,
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "all-reduce {} ranks x {} MiB over {}: {:.1} ms, algbw {algbw:.2} GB/s, busbw {busbw:.2} GB/s ({:.0}% of loopback TCP {loopback:.2} GB/s)",
            a.ranks,
            a.bytes >> 20,
            if a.tcp { "TCP" } else { "shared memory" },
            secs * 1e3,
            100.0 * busbw / loopback
        );
    }
    Ok(())
}

/// One stream over loopback TCP: a writer thread sends `bytes` in 1 MiB writes to a reader;
/// the median of five transfers, in GB/s.
fn loopback_gbps(bytes: usize) -> std::io::Result<f64> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..6 {
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len());
                s.write_all(&chunk[..n])?;
                left -= n;
            }
            let mut ack = [0u8; 1];
            s.read_exact(&mut ack)?;
        }
        Ok(())
    });
    let (mut r, _) = listener.accept()?;
    let mut buf = vec![0u8; 1 << 20];
    let mut times = Vec::new();
    for i in 0..6 {
        let t = std::time::Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len());
            r.read_exact(&mut buf[..n])?;
            left -= n;
        }
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
        r.write_all(&[1])?;
    }
    writer.join().expect("loopback writer")?;
    Ok(bytes as f64 / median(times) / 1e9)
}

fn bench_train(a: TrainBenchArgs) -> Result<(), String> {
    if a.steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    let threads = crate::init_threads(a.threads)?;
    let model = ModelConfig::preset(&a.preset).map_err(|e| e.to_string())?;
    let cfg = TrainConfig {
        batch: a.batch,
        seq_len: a.seq,
        steps: a.steps + 1,
        warmup_steps: 1,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model.clone(), cfg, &DataSpec::Synthetic { vocab: 0, seed: 0 })
        .map_err(|e| e.to_string())?;
    let peak = match a.peak_gflops {
        Some(g) => g,
        None => train::peak::measure_peak(threads, 300).gflops,
    };
    eprintln!("warm-up step ...");
    trainer.train_step().map_err(|e| e.to_string())?;
    let mut times_ms = Vec::new();
    for i in 0..a.steps {
        let s = trainer.train_step().map_err(|e| e.to_string())?;
        eprintln!("step {}/{}: {:.1} ms, loss {:.4}", i + 1, a.steps, s.step_ms, s.loss);
        times_ms.push(s.step_ms);
    }
    times_ms.sort_by(f64::total_cmp);
    let median_ms = times_ms[times_ms.len() / 2];
    let tokens_per_s = (a.batch * a.seq) as f64 / (median_ms / 1e3);
    let flops_per_token = model.flops_per_token(a.seq);
    let model_gflops = tokens_per_s * flops_per_token / 1e9;
    let out = json!({
        "tokens_per_s": tokens_per_s,
        "model_gflops": model_gflops,
        "peak_gflops": peak,
        "mfu": model_gflops / peak,
        "step_ms_median": median_ms,
        "preset": a.preset, "batch": a.batch, "seq": a.seq, "threads": threads,
        "params": model.num_params(), "flops_per_token": flops_per_token,
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "{}: {:.0} tokens/s, {:.1} model GFLOP/s, MFU {:.1}% of {:.0} GFLOP/s (median step {:.0} ms)",
            a.preset,
            tokens_per_s,
            model_gflops,
            100.0 * model_gflops / peak,
            peak,
            median_ms
        );
    }
    Ok(())
}
