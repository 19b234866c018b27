//! `myriad run`: torchrun's command line, Myriad's cluster underneath. `torchrun --nnodes 2
//! --nproc-per-node 4 train.py --lr 3e-4` becomes `myriad run --nnodes 2 --nproc-per-node 4
//! train.py --lr 3e-4`. Without a named controller, a local embedded cluster of exactly the needed
//! size runs the job and goes away afterwards. Every rank's output is printed as the job runs,
//! each line prefixed with its rank, and the exit status says whether the job succeeded.

use clap::Args;
use net::client::{Client, Method};
use proto::api::{JobView, SubmitReply};
use proto::spec::JobSpec;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::cluster_cmd::block_on;
use crate::follow::{Follower, Stream};
use crate::local::{LocalCluster, LocalOptions};

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Submit to this controller instead of starting a local cluster.
    #[arg(long, env = proto::env::MYRIAD_CONTROLLER)]
    controller: Option<String>,
    /// Token file for --controller (or set MYRIAD_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

/// torchrun's description of a job, shared by `myriad run` and `myriad slurm`.
#[derive(Args)]
pub struct JobArgs {
    /// Nodes: N, or MIN:MAX as torchrun takes it (Myriad gangs MAX nodes). Default 1 (under
    /// `myriad slurm`: every node of the allocation).
    #[arg(long, alias = "nnodes")]
    pub nnodes: Option<String>,
    /// Ranks per node.
    #[arg(long = "nproc-per-node", alias = "nproc_per_node", default_value_t = 1)]
    pub nproc_per_node: u32,
    #[arg(long = "max-restarts", alias = "max_restarts", default_value_t = 0)]
    max_restarts: u32,
    /// TORCHELASTIC_RUN_ID.
    #[arg(long = "rdzv-id", alias = "rdzv_id", alias = "run-id")]
    rdzv_id: Option<String>,
    /// Same as --nnodes 1 (torchrun's single-node mode).
    #[arg(long)]
    standalone: bool,
    /// Run the program directly instead of with python.
    #[arg(long = "no-python", alias = "no_python")]
    no_python: bool,
    /// The program is a Python module (python -m).
    #[arg(short = 'm', long = "module")]
    module: bool,
    /// Accepted for compatibility and ignored: Myriad's controller serves rendezvous and picks
    /// MASTER_ADDR and MASTER_PORT for each attempt.
    #[arg(long = "rdzv-backend", alias = "rdzv_backend", hide = true)]
    rdzv_backend: Option<String>,
    #[arg(long = "rdzv-endpoint", alias = "rdzv_endpoint", hide = true)]
    rdzv_endpoint: Option<String>,
    #[arg(long = "master-addr", alias = "master_addr", hide = true)]
    master_addr: Option<String>,
    #[arg(long = "master-port", alias = "master_port", hide = true)]
    master_port: Option<String>,
    #[arg(long = "node-rank", alias = "node_rank", hide = true)]
    node_rank: Option<String>,
    #[arg(long = "monitor-interval", alias = "monitor_interval", hide = true)]
    monitor_interval: Option<String>,
    /// Print the final job as JSON on stdout instead of the ranks' output.
    #[arg(long)]
    pub json: bool,
    /// The training program and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    cmd: Vec<String>,
}

impl JobArgs {
    /// The job spec for `nodes` nodes (from --nnodes, or the caller's default) of which the job
    /// may replace `spares` with hot spares. Says which torchrun flags it ignores.
    pub fn spec(&self, default_nodes: u32, spares: u32) -> Result<JobSpec, String> {
        let nodes = self.nodes(default_nodes)?;
        for (flag, value) in [
            ("--rdzv-backend", &self.rdzv_backend),
            ("--rdzv-endpoint", &self.rdzv_endpoint),
            ("--master-addr", &self.master_addr),
            ("--master-port", &self.master_port),
            ("--node-rank", &self.node_rank),
            ("--monitor-interval", &self.monitor_interval),
        ] {
            if value.is_some() {
                eprintln!("myriad: {flag} ignored (the controller serves rendezvous and picks each attempt's store)");
            }
        }
        let workdir = std::env::current_dir().map_err(|e| format!("current directory: {e}"))?;
        let spec = JobSpec {
            name: crate::cluster_cmd::job_name_from(&self.cmd),
            argv: program_argv(&self.cmd, self.module, self.no_python),
            env: BTreeMap::new(),
            nodes,
            ranks_per_node: self.nproc_per_node,
            spares,
            max_restarts: self.max_restarts,
            checkpoint_dir: None,
            workdir: Some(workdir.to_str().ok_or("the current directory is not UTF-8")?.to_string()),
            run_id: self.rdzv_id.clone(),
            checkpoint_every: 50,
            persist_every: 10,
        };
        spec.validate().map_err(|e| e.to_string())?;
        Ok(spec)
    }

    /// The job's node count: --standalone, --nnodes, else `default_nodes`.
    pub fn nodes(&self, default_nodes: u32) -> Result<u32, String> {
        match (&self.nnodes, self.standalone) {
            (_, true) => Ok(1),
            (Some(text), false) => parse_nnodes(text),
            (None, false) => Ok(default_nodes),
        }
    }
}

/// How often the job's state is polled while it runs.
const POLL_EVERY: Duration = Duration::from_millis(200);
/// Jobs up to this many ranks have every rank's output followed; a larger one has rank 0's (each
/// followed log costs the controller a request per poll).
const FOLLOW_ALL_UP_TO: u32 = 64;
/// Give up when the controller stays unreachable this long.
const UNREACHABLE_LIMIT: Duration = Duration::from_secs(60);

pub fn run(a: RunArgs) -> Result<(), String> {
    let spec = a.job.spec(1, 0)?;
    let nodes = spec.nodes;
    // Either a named controller, or a private local cluster sized for this job.
    let mut local = None;
    let client = match &a.controller {
        Some(url) => {
            let token = crate::cluster_cmd::token(a.token_file.as_deref(), None, "--controller")?;
            Client::new(url, &token, Duration::from_secs(15))?
        }
        None => {
            let dir = net::auth::private_temp_dir(&std::env::temp_dir(), "myriad-run")?;
            let opts = LocalOptions {
                nodes,
                slots: a.job.nproc_per_node,
                spares: 0,
                listen: "127.0.0.1:0".into(),
                heartbeat_ms: 200,
                startup_timeout: Duration::from_secs(30),
                fake_gpus: None,
            };
            let cluster = LocalCluster::start(&dir, &opts)?;
            let client = cluster.client()?;
            local = Some(cluster);
            client
        }
    };
    let result = block_on(follow(&client, &spec, a.job.json, "myriad run"));
    if let Some(mut cluster) = local {
        cluster.stop();
        let dir = cluster.dir.clone();
        drop(cluster);
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

fn parse_nnodes(text: &str) -> Result<u32, String> {
    let max = text.rsplit(':').next().unwrap_or(text);
    match max.trim().parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("--nnodes {text:?} must be a positive number N or MIN:MAX")),
    }
}

/// torchrun runs a script with Python unless told otherwise; Myriad does the same.
fn program_argv(cmd: &[String], module: bool, no_python: bool) -> Vec<String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    if module {
        return [python, "-m".into()].into_iter().chain(cmd.iter().cloned()).collect();
    }
    if !no_python && cmd[0].ends_with(".py") {
        return std::iter::once(python).chain(cmd.iter().cloned()).collect();
    }
    cmd.to_vec()
}

/// Submits, follows the job to its end (Ctrl-C cancels it), then prints every rank's output.
pub async fn follow(client: &Client, spec: &JobSpec, json: bool, who: &str) -> Result<(), String> {
    let body = serde_json::to_vec(spec).expect("spec serialises");
    let bytes = client
        .call(Method::POST, "/v1/jobs", Some((body, "application/json")))
        .await
        .map_err(|e| format!("submit: {e}"))?;
    let id = serde_json::from_slice::<SubmitReply>(&bytes).map_err(|e| format!("submit: {e}"))?.id;
    eprintln!("{who}: job {id}, {} nodes × {} ranks", spec.nodes, spec.ranks_per_node);
    let world = spec.nodes * spec.ranks_per_node;
    let ranks: Vec<u32> = if world <= FOLLOW_ALL_UP_TO { (0..world).collect() } else { vec![0] };
    if world > FOLLOW_ALL_UP_TO {
        eprintln!(
            "{who}: showing rank 0's output ({world} ranks; `myriad logs {id} --rank N --follow` for others)"
        );
    }
    let mut follower = Follower::new(id, ranks, vec![Stream::Stdout, Stream::Stderr], true);
    let mut last_line = String::new();
    let mut unreachable_since: Option<Instant> = None;
    let (mut cancel_wanted, mut cancel_sent) = (false, false);
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    let job = loop {
        let signalled = tokio::select! {
            _ = interrupt.recv() => true,
            _ = terminate.recv() => true,
            _ = tokio::time::sleep(POLL_EVERY) => false,
        };
        if signalled {
            if cancel_wanted {
                return Err(format!("interrupted again; job {id} may still be stopping"));
            }
            eprintln!("{who}: interrupted, cancelling job {id} (interrupt again to leave at once)");
            cancel_wanted = true;
        }
        if cancel_wanted && !cancel_sent {
            match client.call(Method::POST, &format!("/v1/jobs/{id}/cancel"), None).await {
                Ok(_) | Err(net::client::ClientError::Status { status: 409, .. }) => cancel_sent = true,
                Err(e) => eprintln!("{who}: cancel failed ({e}); retrying"),
            }
        }
        match client.get_json::<JobView>(&format!("/v1/jobs/{id}")).await {
            Ok(job) => {
                unreachable_since = None;
                let step = job.step.map(|s| format!(" step {s}")).unwrap_or_default();
                let loss = job.loss.map(|l| format!(" loss {l:.4}")).unwrap_or_default();
                let line = format!("job {id}: {} (attempt {}){step}{loss}", job.state, job.attempt);
                if line != last_line {
                    eprintln!("{who}: {line}");
                    last_line = line;
                }
                let ended = matches!(job.state.as_str(), "succeeded" | "failed" | "cancelled");
                if !json && job.ranks_running + job.ranks_exited > 0 {
                    follower.poll(client, job.attempt, ended).await;
                }
                if ended {
                    break job;
                }
            }
            Err(e) => {
                // Interrupted, and the controller stopped too (under Slurm a scancel signals both
                // at once): nothing is left to wait for.
                if cancel_wanted {
                    return Err(format!("interrupted, and the controller is out of reach ({e}): job {id} may still be stopping"));
                }
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > UNREACHABLE_LIMIT {
                    return Err(format!("lost the controller for {UNREACHABLE_LIMIT:?}: {e}"));
                }
            }
        }
    };
    if json {
        println!("{}", serde_json::to_string(&job).expect("serialises"));
    }
    match job.state.as_str() {
        "succeeded" => Ok(()),
        state => Err(format!("job {id} {state}: {}", job.reason.unwrap_or_default())),
    }
}
