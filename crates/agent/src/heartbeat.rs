//! The agent's side of the controller's API: registration (again after a 404: the controller
//! forgot this node), and the heartbeat loop that reports full state and carries out the commands
//! each reply brings, acknowledging them by sequence number on the next heartbeat. While the
//! controller is unreachable the ranks run on and the loop keeps trying.

use net::client::{Client, ClientError};
use proto::api::{Command, HeartbeatReply, HeartbeatRequest, JobId, RegisterReply, RegisterRequest};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{checkpoints, Agent};

impl Agent {
    /// What the controller hears: the protocol's node state, with the checkpoints this node
    /// holds in memory and the persisted ones of the jobs it leads.
    pub(crate) fn report(&self) -> HeartbeatRequest {
        let node = self.node.lock().expect("agent state");
        let persisted: Vec<(JobId, PathBuf)> =
            node.leading.iter().map(|(&j, l)| (j, l.persist_dir.clone())).collect();
        let mut req = node.state.report();
        req.checkpoints = checkpoints::report(&self.cfg.memory_root, &persisted);
        req.bad_checkpoints = node.bad.clone();
        req.gpu_findings = self.gpus.lock().expect("gpu state").health.findings();
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
        match client.post_json::<_, RegisterReply>("/v1/agents/register", &req).await {
            Ok(reply) => {
                eprintln!("agent {}: registered with {} ({} slots)", cfg.name, client.base(), agent.slots);
                // A fresh registration means the controller forgot whatever this agent held.
                agent.forget_all_exited();
                return reply;
            }
            Err(e) => {
                if !complained {
                    eprintln!("agent {}: cannot register yet ({e}); retrying every second", cfg.name);
                    complained = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

pub(crate) async fn heartbeat_loop(agent: Arc<Agent>, client: Client, http_port: u16) -> Result<(), String> {
    let mut interval =
        Duration::from_millis(register(&agent, &client, http_port).await.heartbeat_interval_ms.max(10));
    let path = format!("/v1/agents/{}/heartbeat", agent.cfg.name);
    let mut unreachable_since: Option<Instant> = None;
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
                if let Some(since) = unreachable_since.take() {
                    eprintln!(
                        "agent {}: controller reachable again after {:.1} s",
                        agent.cfg.name,
                        since.elapsed().as_secs_f64()
                    );
                }
                let mut news = false;
                for c in reply.commands {
                    news |= matches!(c.command, Command::ReservePort { .. } | Command::Launch(_));
                    agent.execute(&c.command).await;
                    agent.node.lock().expect("agent state").state.ack(c.seq);
                }
                if news {
                    // Tell the controller at once what the commands did (ports, launched ranks):
                    // a job's start waits on it.
                    continue;
                }
            }
            Err(ClientError::Status { status: 404, .. }) => {
                interval = Duration::from_millis(
                    register(&agent, &client, http_port).await.heartbeat_interval_ms.max(10),
                );
                continue;
            }
            Err(e) => {
                if unreachable_since.is_none() {
                    eprintln!(
                        "agent {}: heartbeat failed ({e}); ranks keep running, retrying",
                        agent.cfg.name
                    );
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
