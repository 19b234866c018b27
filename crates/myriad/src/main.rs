//! The `myriad` command. Wiring only: parse arguments, call the library crates, print results,
//! turn errors into one line on stderr and a non-zero exit code.

mod bench;
mod progress;
mod train_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "myriad", version, about = "Plan, run and keep alive large-model training", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a GPT model with the reference CPU trainer.
    Train(train_cmd::TrainArgs),
    /// Measure this machine: FMA peak, trainer throughput.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    train::memory::tune_allocator();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train_cmd::run(args),
        Command::Bench(cmd) => bench::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sizes rayon's global pool: `--threads`, else OMP_NUM_THREADS (torchrun sets it per rank),
/// else every core.
pub fn init_threads(requested: Option<usize>) -> Result<usize, String> {
    let from_env = std::env::var("OMP_NUM_THREADS").ok();
    let threads = match (requested, from_env) {
        (Some(0), _) => return Err("--threads must be at least 1".into()),
        (Some(n), _) => n,
        (None, Some(v)) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("OMP_NUM_THREADS={v:?} is not a positive integer")),
        },
        (None, None) => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| format!("could not start {threads} worker threads: {e}"))?;
    Ok(threads)
}
