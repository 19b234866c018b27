//! The agent's side of the controller's API: registration (again after a 404: the controller
//! forgot this node), and the heartbeat loop that reports full state and carries out the commands
//! each reply brings, acknowledging them by sequence number on the next heartbeat. While the
//! controller is unreachable the ranks run on and the loop keeps trying.

use net::client::{Client, ClientError};
use proto::api::{
    Command, HeartbeatReply, HeartbeatRequest, JobId, RegisterReply, RegisterRequest, SeqCommand,
};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{checkpoints, Agent};

impl Agent {
    /// What the controller hears: the protocol's node state, with the checkpoints this node
    /// holds in memory and the persisted ones of the jobs it leads.
    pub(crate) fn report(&self) -> HeartbeatRequest {
        // The GPU lock before the node's, as everywhere; the directories are read under neither.
        let gpu_findings = self.gpus.lock().expect("gpu state").health.findings();
        let (mut req, persisted) = {
            let node = self.node.lock().expect("agent state");
            let persisted: Vec<(JobId, PathBuf)> =
                node.leading.iter().map(|(&j, l)| (j, l.persist_dir.clone())).collect();
            let mut req = node.state.report();
            req.bad_checkpoints = node.bad.clone();
            (req, persisted)
        };
        req.checkpoints = checkpoints::report(&self.cfg.memory_root, &persisted);
        req.gpu_findings = gpu_findings;
        req
    }
}

async fn register(agent: &Agent, client: &Client, http_port: u16) -> RegisterReply {
    let cfg = &agent.cfg;
    let (gpus, driver) = {
        let monitor = agent.gpus.lock().expect("gpu state");
        (monitor.gpus.clone(), monitor.driver.clone())
    };
    let req = RegisterRequest {
        name: cfg.name.clone(),
        slots: agent.slots,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        addr: cfg.addr.clone(),
        http_port,
        spare: cfg.spare,
        gpus,
        driver,
    };
    let mut complained = false;
    loop {
        let sent = Instant::now();
        match client.post_json::<_, RegisterReply>("/v1/agents/register", &req).await {
            Ok(reply) => {
                agent.contact.lock().expect("agent state").answered(sent, reply.lease_ms);
                say!("agent {}: registered with {} ({} slots)", cfg.name, client.base(), agent.slots);
                // A fresh registration means the controller forgot whatever this agent held, and
                // numbers its commands from scratch.
                agent.registration.fetch_add(1, Ordering::Relaxed);
                agent.forget_all_exited();
                return reply;
            }
            Err(e) => {
                if !complained {
                    say!("agent {}: cannot register yet ({e}); retrying every second", cfg.name);
                    complained = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Commands waiting for the executor; the controller resends what is not acknowledged, so a full
/// queue only delays.
const COMMAND_QUEUE: usize = 1024;

/// A command of one registration: acknowledged only if the agent has not registered again since
/// (a controller that lost its state numbers its commands afresh).
struct Queued {
    registration: u64,
    command: SeqCommand,
}

/// Carries out commands in order, off the heartbeat loop: a launch that fetches and verifies a
/// large checkpoint, or waits for an old attempt's ranks to go, never stops the heartbeats (the
/// controller would take the node for lost). Each is acknowledged once done; one that starts
/// something (a port, ranks) wakes the heartbeat so the controller hears of it at once.
async fn execute_commands(agent: Arc<Agent>, mut queue: tokio::sync::mpsc::Receiver<Queued>) {
    while let Some(Queued { registration, command }) = queue.recv().await {
        // A command of an earlier registration is of a controller that has forgotten it.
        if agent.registration.load(Ordering::Relaxed) != registration {
            continue;
        }
        let news = matches!(command.command, Command::ReservePort { .. } | Command::Launch(_));
        agent.execute(&command.command).await;
        if agent.registration.load(Ordering::Relaxed) == registration {
            agent.node.lock().expect("agent state").state.ack(command.seq);
        }
        if news {
            agent.wake.notify_one();
        }
    }
}

pub(crate) async fn heartbeat_loop(agent: Arc<Agent>, client: Client, http_port: u16) -> Result<(), String> {
    let mut interval =
        Duration::from_millis(register(&agent, &client, http_port).await.heartbeat_interval_ms.max(10));
    let path = format!("/v1/agents/{}/heartbeat", agent.cfg.name);
    let mut unreachable_since: Option<Instant> = None;
    let (queue, commands) = tokio::sync::mpsc::channel(COMMAND_QUEUE);
    tokio::spawn(execute_commands(agent.clone(), commands));
    // The newest command handed to the executor in this registration.
    let mut queued_seq = 0;
    loop {
        let silent = agent.silent_until.lock().expect("agent state").is_some_and(|t| Instant::now() < t);
        if silent {
            tokio::time::sleep(interval.min(Duration::from_millis(100))).await;
            continue;
        }
        let req = agent.report();
        let started = Instant::now();
        let answer = client.post_json::<_, HeartbeatReply>(&path, &req).await;
        agent.metrics.heartbeat(started.elapsed().as_secs_f64(), answer.is_ok());
        match answer {
            Ok(reply) => {
                agent.contact.lock().expect("agent state").heard(started);
                if let Some(since) = unreachable_since.take() {
                    say!(
                        "agent {}: controller reachable again after {:.1} s",
                        agent.cfg.name,
                        since.elapsed().as_secs_f64()
                    );
                }
                let registration = agent.registration.load(Ordering::Relaxed);
                for command in reply.commands {
                    if command.seq <= queued_seq {
                        continue;
                    }
                    queued_seq = command.seq;
                    if queue.send(Queued { registration, command }).await.is_err() {
                        return Err("the agent's command executor stopped".into());
                    }
                }
            }
            Err(ClientError::Status { status: 404, .. }) => {
                interval = Duration::from_millis(
                    register(&agent, &client, http_port).await.heartbeat_interval_ms.max(10),
                );
                queued_seq = 0;
                continue;
            }
            Err(e) => {
                if unreachable_since.is_none() {
                    say!("agent {}: heartbeat failed ({e}); ranks keep running, retrying", agent.cfg.name);
                    unreachable_since = Some(Instant::now());
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = agent.wake.notified() => {}
        }
    }
}
