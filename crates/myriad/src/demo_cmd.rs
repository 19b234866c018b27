//! `myriad demo`: the whole system in a few minutes on one machine. A local cluster (4 nodes and a
//! hot spare by default) trains `small` data-parallel on the synthetic source while a scripted mix
//! of faults hits it; every fault's detection and recovery is shown as it happens, and a summary
//! ends the run: steps, final loss against the entropy floor, MFU, effective training time and
//! where the lost time went.

use clap::Args;
use net::client::{Client, Method};
use proto::api::{ChaosAction, ChaosRequest, Event, JobView, SubmitReply};
use proto::events::EventKind;
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use crate::cluster_cmd::block_on;
use crate::local::{LocalCluster, LocalOptions};

#[derive(Args)]
pub struct DemoArgs {
    /// Nodes training (one rank each).
    #[arg(long, default_value_t = 4)]
    nodes: u32,
    /// Hot spares.
    #[arg(long, default_value_t = 1)]
    spares: u32,
    #[arg(long, default_value = "small")]
    preset: String,
    #[arg(long, default_value_t = 400)]
    steps: u64,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    seq: usize,
    /// Steps between the checkpoint directories rank 0 hands its agent (copied to a buddy
    /// node; every second one persisted). Restarts use the ranks' live state, kept every step.
    #[arg(long, default_value_t = 50)]
    checkpoint_every: u64,
    /// Faults as ACTION@STEP, comma-separated. Actions: kill-rank, hang-rank, slow-rank,
    /// kill-agent, partition, corrupt-checkpoint, kill-controller.
    #[arg(
        long,
        default_value = "kill-rank@60,hang-rank@120,corrupt-checkpoint@170,kill-agent@200,kill-controller@260,kill-rank@320"
    )]
    faults: String,
    /// Run without any fault (the reference a faulted run must match).
    #[arg(long)]
    no_faults: bool,
    /// Controller heartbeat interval; a node is lost after three.
    #[arg(long, default_value_t = 500)]
    heartbeat_ms: u64,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Keep the cluster directory (logs, checkpoints) instead of removing it.
    #[arg(long)]
    keep: bool,
    /// After the summary, keep the cluster and its dashboard up until Ctrl-C.
    #[arg(long)]
    stay: bool,
    /// Save the final weights and optimizer state here (to compare runs bit for bit).
    #[arg(long)]
    final_checkpoint: Option<std::path::PathBuf>,
}

struct Fault {
    action: String,
    step: u64,
}

fn parse_faults(text: &str) -> Result<Vec<Fault>, String> {
    const ACTIONS: [&str; 7] = [
        "kill-rank",
        "hang-rank",
        "slow-rank",
        "kill-agent",
        "partition",
        "corrupt-checkpoint",
        "kill-controller",
    ];
    let mut faults = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (action, step) = item.split_once('@').ok_or(format!("fault {item:?} must be ACTION@STEP"))?;
        if !ACTIONS.contains(&action) {
            return Err(format!("fault {item:?}: unknown action {action:?} (one of {})", ACTIONS.join(", ")));
        }
        let step = step.parse().map_err(|_| format!("fault {item:?}: {step:?} is not a step number"))?;
        faults.push(Fault { action: action.to_string(), step });
    }
    faults.sort_by_key(|f| f.step);
    Ok(faults)
}

pub fn run(a: DemoArgs) -> Result<(), String> {
    let mut faults = if a.no_faults { Vec::new() } else { parse_faults(&a.faults)? };
    if let Some(f) = faults.iter().find(|f| f.step >= a.steps) {
        return Err(format!("fault {}@{} comes after the last step ({})", f.action, f.step, a.steps));
    }
    if faults.iter().filter(|f| f.action == "kill-agent").count() > a.spares as usize {
        return Err(format!(
            "{} kill-agent faults need as many spares (--spares {})",
            faults.len(),
            a.spares
        ));
    }
    let dir = net::auth::private_temp_dir(&std::env::temp_dir(), "myriad-demo")?;
    let opts = LocalOptions {
        nodes: a.nodes,
        slots: 1,
        spares: a.spares,
        listen: "127.0.0.1:0".into(),
        heartbeat_ms: a.heartbeat_ms,
        startup_timeout: Duration::from_secs(30),
        fake_gpus: None,
    };
    eprintln!(
        "myriad demo: starting a local cluster: {} nodes + {} spare, controller and agents as processes",
        a.nodes, a.spares
    );
    let mut cluster = LocalCluster::start(&dir, &opts)?;
    eprintln!("dashboard: {}", crate::local::dashboard_link(&cluster.url, &cluster.token));
    let client = cluster.client()?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?.display().to_string();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let threads = (cores / a.nodes).max(1);
    // MFU against this machine's peak, measured once: the "nodes" share its cores.
    let peak_gflops = train::peak::measure_peak(cores as usize, 200).gflops;
    let argv: Vec<String> = [
        exe.as_str(),
        "train",
        "--preset",
        &a.preset,
        "--steps",
        &a.steps.to_string(),
        "--batch",
        &a.batch.to_string(),
        "--seq",
        &a.seq.to_string(),
        "--json",
        "--peak-gflops",
        &format!("{peak_gflops:.1}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(a.final_checkpoint.iter().flat_map(|d| ["--checkpoint-dir".to_string(), d.display().to_string()]))
    .collect();
    let spec = json!({
        "name": format!("demo-{}", a.preset), "argv": argv, "nodes": a.nodes, "ranks_per_node": 1,
        "spares": a.spares, "max_restarts": 50, "checkpoint_every": a.checkpoint_every, "persist_every": 2,
        // The "nodes" share this machine's cores: one share each, not every core each.
        "env": { "OMP_NUM_THREADS": threads.to_string() },
    });
    let started = Instant::now();
    let result = block_on(async {
        let body = serde_json::to_vec(&spec).expect("serialises");
        let bytes = client
            .call(Method::POST, "/v1/jobs", Some((body, "application/json")))
            .await
            .map_err(|e| format!("submit: {e}"))?;
        let id = serde_json::from_slice::<SubmitReply>(&bytes).map_err(|e| e.to_string())?.id;
        eprintln!(
            "job {id}: {} × {} ranks, `{}` for {} steps, state kept live every step, checkpoint directory every {} steps, {} faults scheduled",
            a.nodes, 1, a.preset, a.steps, a.checkpoint_every, faults.len()
        );
        follow(&mut cluster, &client, id, &mut faults, a.steps, started).await
    });
    let summary = match result {
        Ok((job, events)) => summarize(&client, &job, &events, &a, started),
        Err(e) => Err(e),
    };
    if a.stay {
        eprintln!("the cluster stays up for its dashboard; Ctrl-C stops it");
        block_on(net::http::shutdown_signal());
    }
    cluster.stop();
    if a.keep {
        eprintln!("cluster directory kept: {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    summary
}

async fn follow(
    cluster: &mut LocalCluster,
    client: &Client,
    id: u64,
    faults: &mut Vec<Fault>,
    steps: u64,
    started: Instant,
) -> Result<(JobView, Vec<Event>), String> {
    let tty = std::io::stderr().is_terminal();
    let mut seen_seq = 0u64;
    let mut events = Vec::new();
    let mut last_line = Instant::now() - Duration::from_secs(60);
    let mut unreachable_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        cluster.supervise()?;
        let (job, new) = match poll(client, id, seen_seq).await {
            Ok(x) => {
                unreachable_since = None;
                x
            }
            Err(e) => {
                // The controller may be down on purpose; the supervisor brings it back.
                if unreachable_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(60) {
                    return Err(format!("lost the controller: {e}"));
                }
                continue;
            }
        };
        for e in &new {
            seen_seq = seen_seq.max(e.seq);
            if let Some(line) = describe(e) {
                if tty {
                    eprint!("\r\x1b[2K");
                }
                eprintln!("{:>7.1}s  {line}", started.elapsed().as_secs_f64());
            }
        }
        events.extend(new);
        let step = job.step.unwrap_or(0);
        if tty || last_line.elapsed() > Duration::from_secs(5) {
            let line = format!(
                "step {step}/{steps}  loss {}  {} tok/s  MFU {}  ETTR {}  [{}]",
                job.loss.map_or("-".into(), |l| format!("{l:.4}")),
                job.tokens_per_s.map_or("-".into(), |t| format!("{t:.0}")),
                job.mfu.map_or("-".into(), |m| format!("{:.1}%", 100.0 * m)),
                job.ettr.map_or("-".into(), |e| format!("{:.1}%", 100.0 * e)),
                job.state,
            );
            if tty {
                eprint!("\r\x1b[2K{line}");
            } else {
                eprintln!("{:>7.1}s  {line}", started.elapsed().as_secs_f64());
            }
            let _ = std::io::stderr().flush();
            last_line = Instant::now();
        }
        if matches!(job.state.as_str(), "succeeded" | "failed" | "cancelled") {
            if tty {
                eprintln!();
            }
            return Ok((job, events));
        }
        if job.state == "running" && faults.first().is_some_and(|f| step >= f.step) {
            let fault = faults.remove(0);
            if tty {
                eprint!("\r\x1b[2K");
            }
            eprintln!("{:>7.1}s  FAULT    {} at step {step}", started.elapsed().as_secs_f64(), fault.action);
            if let Err(e) = inject(cluster, client, &job, &fault.action).await {
                eprintln!("          could not inject {}: {e}", fault.action);
            }
        }
    }
}

async fn poll(client: &Client, id: u64, after: u64) -> Result<(JobView, Vec<Event>), String> {
    let job: JobView = client.get_json(&format!("/v1/jobs/{id}")).await.map_err(|e| e.to_string())?;
    let events: Vec<Event> =
        client.get_json(&format!("/v1/events?after={after}")).await.map_err(|e| e.to_string())?;
    Ok((job, events))
}

/// The rank or node each fault hits: a different one each time, never rank 0's node for a
/// node loss (so the leader's memory copy and its buddy both matter in turn).
async fn inject(
    cluster: &mut LocalCluster,
    client: &Client,
    job: &JobView,
    action: &str,
) -> Result<(), String> {
    let world = job.world_size.max(1);
    let (chaos, rank, node, seconds) = match action {
        "kill-controller" => {
            let pid = cluster.controller_pid().ok_or("no controller")?;
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            return Ok(());
        }
        "kill-rank" => (ChaosAction::KillRank, Some(1 % world), None, None),
        "hang-rank" => (ChaosAction::HangRank, Some(2 % world), None, None),
        "slow-rank" => (ChaosAction::SlowRank, Some(1 % world), None, Some(20.0)),
        "kill-agent" => (ChaosAction::KillAgent, None, job.nodes.last().cloned(), None),
        "partition" => (ChaosAction::Partition, None, job.nodes.last().cloned(), Some(5.0)),
        "corrupt-checkpoint" => (ChaosAction::CorruptCheckpoint, None, None, None),
        other => return Err(format!("unknown fault {other}")),
    };
    let req = ChaosRequest { action: chaos, job_id: Some(job.id), rank, node, seconds, factor: Some(3.0) };
    let body = serde_json::to_vec(&req).expect("serialises");
    client
        .call(Method::POST, "/v1/chaos", Some((body, "application/json")))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// One line per event worth showing live.
fn describe(e: &Event) -> Option<String> {
    use EventKind as K;
    let label = match EventKind::parse(&e.kind)? {
        K::Chaos => "inject",
        K::RankHung
        | K::NodeLost
        | K::AttemptFailed
        | K::CheckpointCorrupt
        | K::LeftoverRanks
        | K::Straggler => "DETECT",
        K::Recovered => "RECOVER",
        K::Scheduled | K::JobSucceeded | K::JobFailed | K::NodeReturned | K::NodeRegistered => "",
        _ => return None,
    };
    let node = e.node.as_deref().map(|n| format!(" [{n}]")).unwrap_or_default();
    Some(format!("{label:<8} {}{node}", e.message))
}

fn summarize(
    client: &Client,
    job: &JobView,
    events: &[Event],
    a: &DemoArgs,
    started: Instant,
) -> Result<(), String> {
    let stderr =
        block_on(client.call(Method::GET, &format!("/v1/jobs/{}/logs?rank=0&stream=stderr", job.id), None))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
    let floor: Option<f64> = stderr
        .lines()
        .find_map(|l| l.split("entropy floor ").nth(1))
        .and_then(|rest| rest.split(|c: char| c != '.' && !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok());
    let recoveries: Vec<&serde_json::Value> =
        events.iter().filter(|e| e.is(EventKind::Recovered)).filter_map(|e| e.data.as_ref()).collect();
    let lost_steps: u64 = recoveries.iter().filter_map(|d| d["lost_steps"].as_u64()).sum();
    let t = &job.time;
    if a.json {
        let losses = committed_losses(client, job);
        let out = json!({
            "job": job.id, "state": job.state, "steps": job.step, "loss": job.loss, "entropy_floor": floor,
            "mfu": job.mfu, "tokens_per_s": job.tokens_per_s, "ettr": job.ettr, "time": t, "faults": job.faults,
            "restarts": job.restarts, "lost_steps": lost_steps, "recoveries": recoveries,
            "wall_s": started.elapsed().as_secs_f64(), "losses": losses, "events": events,
        });
        println!("{out}");
    } else {
        println!();
        println!("== summary: job {} {}", job.id, job.state);
        println!(
            "steps        {} of {} ({} restarts, {} faults)",
            job.step.unwrap_or(0),
            a.steps,
            job.restarts,
            job.faults
        );
        match (job.loss, floor) {
            (Some(l), Some(f)) => {
                println!("final loss   {l:.4}, {:.4} nats above the entropy floor {f:.4}", l - f)
            }
            (Some(l), None) => println!("final loss   {l:.4}"),
            _ => {}
        }
        if let Some(m) = job.mfu {
            println!("MFU          {:.1}% of the measured FP32 FMA peak (rank 0's last step)", 100.0 * m);
        }
        println!(
            "ETTR         {} (committed step time {:.1} s of {:.1} s wall)",
            job.ettr.map_or("-".into(), |e| format!("{:.1}%", 100.0 * e)),
            t.committed_ms / 1e3,
            t.wall_ms as f64 / 1e3
        );
        let other =
            t.wall_ms as f64 - t.committed_ms - t.startup_ms - t.detection_ms - t.restart_ms - t.recompute_ms;
        println!(
            "lost time    start-up {:.1} s, detection {:.1} s, restart {:.1} s, recomputation {:.1} s, other {:.1} s (checkpoints, reporting)",
            t.startup_ms / 1e3,
            t.detection_ms / 1e3,
            t.restart_ms / 1e3,
            t.recompute_ms / 1e3,
            other.max(0.0) / 1e3
        );
        println!("lost steps   {lost_steps} recomputed in total");
        for (i, d) in recoveries.iter().enumerate() {
            println!(
                "fault {}      {}: detection {:.2} s, restart {:.2} s, recomputation {:.2} s ({} steps)",
                i + 1,
                d["cause"].as_str().unwrap_or("?"),
                d["detection_s"].as_f64().unwrap_or(0.0),
                d["restart_s"].as_f64().unwrap_or(0.0),
                d["recompute_s"].as_f64().unwrap_or(0.0),
                d["lost_steps"].as_u64().unwrap_or(0)
            );
        }
    }
    if job.state != "succeeded" {
        return Err(format!("job {} {}: {}", job.id, job.state, job.reason.clone().unwrap_or_default()));
    }
    Ok(())
}

/// Rank 0's loss at every committed step: its JSON lines from every attempt, a later attempt's
/// line replacing an earlier one for the same step (that step was rolled back and redone).
fn committed_losses(client: &Client, job: &JobView) -> Vec<(u64, f64)> {
    let mut losses = std::collections::BTreeMap::new();
    for attempt in 0..=job.attempt {
        let path = format!("/v1/jobs/{}/logs?rank=0&stream=stdout&attempt={attempt}", job.id);
        let Ok(bytes) = block_on(client.call(Method::GET, &path, None)) else { continue };
        for line in String::from_utf8_lossy(&bytes).lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            if let (Some(step), Some(loss)) = (v["step"].as_u64(), v["loss"].as_f64()) {
                losses.insert(step, loss);
            }
        }
    }
    losses.into_iter().collect()
}
