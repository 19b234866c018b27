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
    /// Nodes: N, or MIN:MAX as torchrun takes it (Myriad gangs MAX nodes).
    #[arg(long, alias = "nnodes", default_value = "1")]
    nnodes: String,
    /// Ranks per node.
    #[arg(long = "nproc-per-node", alias = "nproc_per_node", default_value_t = 1)]
    nproc_per_node: u32,
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
    /// Submit to this controller instead of starting a local cluster.
    #[arg(long, env = proto::env::MYRIAD_CONTROLLER)]
    controller: Option<String>,
    /// Token file for --controller (or set MYRIAD_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Print the final job as JSON on stdout instead of the ranks' output.
    #[arg(long)]
    json: bool,
    /// The training program and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    cmd: Vec<String>,
}

/// How often the job's state is polled while it runs.
const POLL_EVERY: Duration = Duration::from_millis(200);
/// Jobs up to this many ranks have every rank's output followed; a larger one has rank 0's (each
/// followed log costs the controller a request per poll).
const FOLLOW_ALL_UP_TO: u32 = 64;
/// Give up when the controller stays unreachable this long.
const UNREACHABLE_LIMIT: Duration = Duration::from_secs(60);

pub fn run(a: RunArgs) -> Result<(), String> {
    let nodes = parse_nnodes(&a.nnodes, a.standalone)?;
    for (flag, value) in [
        ("--rdzv-backend", &a.rdzv_backend),
        ("--rdzv-endpoint", &a.rdzv_endpoint),
        ("--master-addr", &a.master_addr),
        ("--master-port", &a.master_port),
        ("--node-rank", &a.node_rank),
        ("--monitor-interval", &a.monitor_interval),
    ] {
        if value.is_some() {
            eprintln!("myriad run: {flag} ignored (the controller serves rendezvous and picks each attempt's store)");
        }
    }
    let argv = program_argv(&a.cmd, a.module, a.no_python);
    let workdir = std::env::current_dir().map_err(|e| format!("current directory: {e}"))?;
    let spec = JobSpec {
        name: crate::cluster_cmd::job_name_from(&a.cmd),
        argv,
        env: BTreeMap::new(),
        nodes,
        ranks_per_node: a.nproc_per_node,
        spares: 0,
        max_restarts: a.max_restarts,
        checkpoint_dir: None,
        workdir: Some(workdir.to_str().ok_or("the current directory is not UTF-8")?.to_string()),
        run_id: a.rdzv_id.clone(),
        checkpoint_every: 50,
        persist_every: 10,
    };
    spec.validate().map_err(|e| e.to_string())?;

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
                slots: a.nproc_per_node,
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
    let result = block_on(follow(&client, &spec, a.json));
    if let Some(mut cluster) = local {
        cluster.stop();
        let dir = cluster.dir.clone();
        drop(cluster);
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

fn parse_nnodes(text: &str, standalone: bool) -> Result<u32, String> {
    if standalone {
        return Ok(1);
    }
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
async fn follow(client: &Client, spec: &JobSpec, json: bool) -> Result<(), String> {
    let body = serde_json::to_vec(spec).expect("spec serialises");
    let bytes = client
        .call(Method::POST, "/v1/jobs", Some((body, "application/json")))
        .await
        .map_err(|e| format!("submit: {e}"))?;
    let id = serde_json::from_slice::<SubmitReply>(&bytes).map_err(|e| format!("submit: {e}"))?.id;
    eprintln!("myriad run: job {id}, {} nodes × {} ranks", spec.nodes, spec.ranks_per_node);
    let world = spec.nodes * spec.ranks_per_node;
    let ranks: Vec<u32> = if world <= FOLLOW_ALL_UP_TO { (0..world).collect() } else { vec![0] };
    if world > FOLLOW_ALL_UP_TO {
        eprintln!(
            "myriad run: showing rank 0's output ({world} ranks; `myriad logs {id} --rank N --follow` for others)"
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
            eprintln!("myriad run: interrupted, cancelling job {id} (interrupt again to leave at once)");
            cancel_wanted = true;
        }
        if cancel_wanted && !cancel_sent {
            match client.call(Method::POST, &format!("/v1/jobs/{id}/cancel"), None).await {
                Ok(_) | Err(net::client::ClientError::Status { status: 409, .. }) => cancel_sent = true,
                Err(e) => eprintln!("myriad run: cancel failed ({e}); retrying"),
            }
        }
        match client.get_json::<JobView>(&format!("/v1/jobs/{id}")).await {
            Ok(job) => {
                unreachable_since = None;
                let step = job.step.map(|s| format!(" step {s}")).unwrap_or_default();
                let loss = job.loss.map(|l| format!(" loss {l:.4}")).unwrap_or_default();
                let line = format!("job {id}: {} (attempt {}){step}{loss}", job.state, job.attempt);
                if line != last_line {
                    eprintln!("myriad run: {line}");
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
