//! The `myriad` command. Wiring only: parse arguments, call the library crates, print results,
//! turn errors into one line on stderr and a non-zero exit code.

mod bench;
mod bench_control;
mod cluster_cmd;
mod demo_cmd;
mod follow;
mod local;
mod plan_cmd;
mod progress;
mod run_cmd;
mod sim_cmd;
mod slurm_cmd;
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
    /// The whole system in a few minutes: a local cluster trains through injected faults.
    Demo(demo_cmd::DemoArgs),
    /// Train a GPT model with the reference CPU trainer.
    Train(train_cmd::TrainArgs),
    /// Measure this machine: FMA peak, trainer throughput.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run a job like torchrun does: `myriad run --nnodes 2 --nproc-per-node 2 train.py`.
    Run(run_cmd::RunArgs),
    /// Run a job inside a Slurm allocation (from an sbatch script): controller, agents, spares.
    Slurm(slurm_cmd::SlurmArgs),
    /// One agent of `myriad slurm`'s srun step (started by `myriad slurm`).
    #[command(hide = true)]
    SlurmAgent(slurm_cmd::SlurmAgentArgs),
    /// Start a local cluster (controller and agents) in the foreground.
    Up(cluster_cmd::UpArgs),
    /// Submit a job (TOML file or flags) to a controller.
    Submit(cluster_cmd::SubmitArgs),
    /// Jobs and nodes; one job in detail with its events.
    Status(cluster_cmd::StatusArgs),
    /// A rank's stdout or stderr.
    Logs(cluster_cmd::LogsArgs),
    /// Cancel a job.
    Cancel(cluster_cmd::CancelArgs),
    /// The cluster's nodes and their health.
    Nodes(cluster_cmd::NodesArgs),
    /// Run the controller (HTTP API, scheduling, SQLite state).
    Controller(cluster_cmd::ControllerArgs),
    /// Run a node agent.
    Agent(cluster_cmd::AgentArgs),
    /// Simulate a long job on a large cluster through the controller's real policy.
    Simulate(sim_cmd::SimulateArgs),
    /// Inject a fault: kill-rank, hang-rank, slow-rank, kill-agent, partition, corrupt-checkpoint, kill-controller.
    Chaos(cluster_cmd::ChaosArgs),
    /// The parallel layouts with the highest MFU that fit; `plan validate` checks the model.
    Plan(plan_cmd::PlanArgs),
}

fn main() -> ExitCode {
    train::memory::tune_allocator();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train_cmd::run(args),
        Command::Demo(args) => demo_cmd::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Run(args) => run_cmd::run(args),
        Command::Slurm(args) => slurm_cmd::run(args),
        Command::SlurmAgent(args) => slurm_cmd::agent(args),
        Command::Up(args) => cluster_cmd::up(args),
        Command::Submit(args) => cluster_cmd::submit(args),
        Command::Status(args) => cluster_cmd::status(args),
        Command::Logs(args) => cluster_cmd::logs(args),
        Command::Cancel(args) => cluster_cmd::cancel(args),
        Command::Nodes(args) => cluster_cmd::nodes(args),
        Command::Controller(args) => cluster_cmd::controller(args),
        Command::Agent(args) => cluster_cmd::agent(args),
        Command::Chaos(args) => cluster_cmd::chaos(args),
        Command::Plan(args) => plan_cmd::run(args),
        Command::Simulate(args) => sim_cmd::run(args),
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
    let from_env = std::env::var(proto::env::OMP_NUM_THREADS).ok();
    let threads = match (requested, from_env) {
        (Some(0), _) => return Err("--threads must be at least 1".into()),
        (Some(n), _) => n,
        (None, Some(v)) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("{}={v:?} is not a positive integer", proto::env::OMP_NUM_THREADS)),
        },
        (None, None) => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| format!("could not start {threads} worker threads: {e}"))?;
    Ok(threads)
}
