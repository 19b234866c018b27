//! Jobs and gang scheduling: submit and cancel, FIFO placement (all of a job's nodes or none; the
//! oldest queued job is never overtaken), the port reservation, each node's launch with torchrun's
//! environment, and the attempt's rendezvous table.

use crate::*;
use proto::env::{self, NodeEnv};

impl Core {
    pub(crate) fn port_reserved(
        &mut self,
        node: NodeId,
        job_id: JobId,
        attempt: u32,
        port: u16,
        now_ms: u64,
    ) {
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        let Some(a) = job.attempt.as_mut() else { return };
        if a.number != attempt || a.outcome.is_some() || a.master_port.is_some() || a.nodes[0] != node {
            return;
        }
        a.master_port = Some(port);
        self.dirty_jobs.insert(job_id);
        let restore = self.restore_point(&self.jobs[&job_id]);
        let restore_step = restore.as_ref().map_or(0, |r| r.step);
        let job = self.jobs.get_mut(&job_id).expect("checked above");
        if let Some(p) = job.account.pending.as_mut() {
            p.restore_step = restore_step;
        }
        job.step = Some(restore_step);
        let job = &self.jobs[&job_id];
        let a = job.attempt.as_ref().expect("checked above");
        // One plan for every node of the attempt: each node's queue holds it and its group rank.
        let plan = Arc::new(self.launch_plan(job, a, restore));
        let nodes = a.nodes.clone();
        for (group, &n) in nodes.iter().enumerate() {
            let cores = self.nodes[n.index()].cores;
            self.command(n, Queued::Launch { plan: plan.clone(), group: group as u32, cores });
        }
        self.node_event(
            now_ms,
            Some(job_id),
            node,
            EventKind::Launching,
            format!("attempt {attempt}: MASTER_PORT {port}, launching ranks"),
        );
    }

    /// torchrun's environment for every rank of the attempt, plus Myriad's own: all of it but
    /// each node's group rank (and core count), which [`LaunchPlan::spec`] fills in.
    pub(crate) fn launch_plan(&self, job: &Job, a: &Attempt, restore: Option<RestoreSpec>) -> LaunchPlan {
        let spec = &job.spec;
        let nproc = spec.ranks_per_node;
        let world = spec.world_size();
        let master = &self.nodes[a.nodes[0].index()];
        let omp = match spec.env.get(env::OMP_NUM_THREADS) {
            Some(v) => Some(v.clone()),
            // torchrun's rule: one thread per rank when a node runs several; else the node's cores.
            None if nproc > 1 => Some("1".into()),
            None => None,
        };
        // The job's own variables first, then Myriad's (a spec cannot name a reserved one).
        // RANK, LOCAL_RANK and ROLE_RANK, the only per-rank ones, come from LaunchSpec::rank_env.
        let job_env: Vec<(String, String)> = spec
            .env
            .iter()
            .filter(|(k, _)| *k != env::OMP_NUM_THREADS)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let node_env = NodeEnv {
            world_size: world,
            local_world_size: nproc,
            group_rank: 0,
            group_world_size: spec.nodes,
            role_name: "default".into(),
            master_addr: master.addr.clone(),
            master_port: a.master_port.expect("launch follows the port"),
            restart_count: job.restarts,
            max_restarts: spec.max_restarts,
            run_id: spec.run_id.clone().unwrap_or_else(|| format!("myriad-{}", job.id)),
            // Rank 0 hosts the store itself on MASTER_PORT; the agent does not speak its protocol.
            use_agent_store: false,
            // Each node's, in LaunchPlan::spec.
            omp_num_threads: String::new(),
            job_id: job.id,
            attempt: a.number,
            // Hashed once for all of the attempt's nodes.
            comm_secret: env::comm_secret(&self.cfg.comm_secret_key, job.id, a.number),
        };
        // The buddy keeps a copy of the leader's in-memory checkpoints on another node: the next
        // node of the job, or for a one-node job any other healthy node.
        let other = a
            .nodes
            .get(1)
            .map(|n| &self.nodes[n.index()])
            .or_else(|| self.nodes_by_name().find(|n| n.health == Health::Healthy && n.id != a.nodes[0]));
        LaunchPlan {
            job_id: job.id,
            attempt: a.number,
            argv: spec.argv.clone(),
            workdir: spec.workdir.clone(),
            checkpoint_dir: spec.checkpoint_dir.clone().unwrap_or_else(|| format!("job-{}", job.id)),
            ranks_per_node: nproc,
            job_env,
            node_env,
            omp_num_threads: omp,
            restore,
            buddy: other.map(|n| format!("http://{}:{}", n.addr, n.http_port)),
            checkpoint_every: spec.checkpoint_every,
            persist_every: spec.persist_every,
        }
    }

    /// Queues a job. Refuses one that no cluster of the registered nodes could ever hold.
    pub fn submit(&mut self, spec: JobSpec, now_ms: u64) -> Result<JobId, CoreError> {
        spec.validate().map_err(CoreError::Spec)?;
        let fits = |n: &&Node| n.slots >= spec.ranks_per_node;
        let regular = self.nodes.iter().filter(|n| !n.spare).filter(fits).count() as u64;
        let spares = self.nodes.iter().filter(|n| n.spare).filter(fits).count() as u64;
        let max_slots = self.nodes.iter().map(|n| n.slots).max().unwrap_or(0);
        if spec.ranks_per_node > max_slots {
            let message =
                format!("{} ranks per node, but the largest node has {max_slots} slots", spec.ranks_per_node);
            // Well-formed, but this cluster cannot hold it: a conflict with its state (409).
            return Err(CoreError::Conflict(format!("ranks_per_node: {message}")));
        }
        let usable = regular + spares.min(spec.spares as u64);
        if spec.nodes as u64 > usable {
            let message = format!(
                "{} nodes of {} slots needed, but the cluster has {regular} such nodes and the job may use {} of its {spares} spares",
                spec.nodes,
                spec.ranks_per_node,
                spares.min(spec.spares as u64)
            );
            return Err(CoreError::Conflict(format!("nodes: {message}")));
        }
        let id = self.next_job_id;
        self.next_job_id += 1;
        let message =
            format!("{} submitted: {} nodes × {} ranks", spec.name, spec.nodes, spec.ranks_per_node);
        self.jobs.insert(
            id,
            Job {
                id,
                spec,
                state: JobState::Queued,
                submitted_ms: now_ms,
                ended_ms: None,
                restarts: 0,
                reason: None,
                attempt: None,
                placements: Vec::new(),
                placements_from: 0,
                step: None,
                loss: None,
                persisted: BTreeSet::new(),
                bad_steps: BTreeSet::new(),
                tokens_per_s: None,
                mfu: None,
                account: Account::default(),
                history: History::default(),
                evicted: BTreeSet::new(),
            },
        );
        self.dirty_jobs.insert(id);
        self.event(now_ms, Some(id), None, EventKind::Submitted, message);
        self.schedule(now_ms);
        Ok(id)
    }

    pub fn cancel(&mut self, id: JobId, now_ms: u64) -> Result<(), CoreError> {
        let job = self.jobs.get_mut(&id).ok_or(CoreError::UnknownJob(id))?;
        if job.state.is_final() {
            return Err(CoreError::Conflict(format!("job {id} already ended ({})", job.state.as_str())));
        }
        if job.state == JobState::Queued {
            job.state = JobState::Cancelled;
            job.ended_ms = Some(now_ms);
            job.reason = Some("cancelled while queued".into());
            self.dirty_jobs.insert(id);
            self.event(now_ms, Some(id), None, EventKind::JobCancelled, "cancelled while queued".into());
            self.schedule(now_ms);
            return Ok(());
        }
        let attempt = job.attempt.as_ref().expect("a started job has an attempt").number;
        let reason = "cancelled by request".to_string();
        self.end_attempt(id, attempt, Outcome::Cancel, (FaultKind::None, reason), now_ms, now_ms);
        self.maybe_finish_attempt(id, now_ms);
        Ok(())
    }

    /// Whether evicting a node of `job_id` leaves it somewhere to go: a restart left, a spare
    /// it may still use, and a spare free for it.
    pub(crate) fn spare_for(&self, job_id: JobId) -> bool {
        let Some(job) = self.jobs.get(&job_id) else { return false };
        let Some(a) = job.attempt.as_ref() else { return false };
        let spares_used = a.nodes.iter().filter(|n| self.nodes[n.index()].spare).count();
        job.restarts < job.spec.max_restarts
            && spares_used < job.spec.spares as usize
            && self
                .nodes
                .iter()
                .any(|n| n.spare && n.has_room(job.spec.ranks_per_node) && !job.evicted.contains(&n.id))
    }

    /// Gang scheduling, first come first served: the oldest queued job starts when enough healthy
    /// nodes have the free slots for all its ranks at once; younger jobs wait behind it so a large
    /// job is never starved by small ones.
    pub(crate) fn schedule(&mut self, now_ms: u64) {
        self.schedule_due = false;
        let queued: Vec<JobId> =
            self.jobs.values().filter(|j| j.state == JobState::Queued).map(|j| j.id).collect();
        for job_id in queued {
            let job = &self.jobs[&job_id];
            let (need, per_node) = (job.spec.nodes as usize, job.spec.ranks_per_node);
            let mut spares_left = job.spec.spares as usize;
            let free = |n: &Node| n.has_room(per_node);
            // A restart goes back to the nodes it ran on (their memory holds its checkpoints), each
            // in its old group rank; only the missing ones are replaced, regular nodes first.
            let mut slots: Vec<Option<NodeId>> = vec![None; need];
            // Nodes already given a group of this attempt, by id.
            let mut taken = vec![false; self.nodes.len()];
            if let Some(previous) = job.placements.last() {
                for (slot, &id) in slots.iter_mut().zip(previous) {
                    let n = &self.nodes[id.index()];
                    if free(n) && (!n.spare || spares_left > 0) && !job.evicted.contains(&id) {
                        spares_left -= n.spare as usize;
                        *slot = Some(id);
                        taken[id.index()] = true;
                    }
                }
            }
            let mut holes = (0..need).filter(|&i| slots[i].is_none()).collect::<Vec<usize>>().into_iter();
            let mut hole = holes.next();
            // Regular nodes, then spares; nodes evicted from this job for straggling only when
            // nothing else is free (slow beats stuck in the queue). In name order.
            for (spare, evicted) in [(false, false), (true, false), (false, true), (true, true)] {
                if hole.is_none() {
                    break;
                }
                let candidate =
                    |n: &&Node| n.spare == spare && free(n) && job.evicted.contains(&n.id) == evicted;
                for n in self.nodes_by_name().filter(candidate) {
                    let Some(i) = hole else { break };
                    if !taken[n.id.index()] && (!spare || spares_left > 0) {
                        spares_left -= spare as usize;
                        taken[n.id.index()] = true;
                        slots[i] = Some(n.id);
                        hole = holes.next();
                    }
                }
            }
            let Some(chosen) = slots.into_iter().collect::<Option<Vec<NodeId>>>() else { return };
            self.start_attempt(job_id, chosen, now_ms);
        }
    }

    pub(crate) fn start_attempt(&mut self, job_id: JobId, nodes: Vec<NodeId>, now_ms: u64) {
        let job = self.jobs.get_mut(&job_id).expect("queued job exists");
        let number = job.restarts;
        let per_node = job.spec.ranks_per_node;
        job.state = JobState::Starting;
        job.attempt = Some(Attempt {
            number,
            nodes: nodes.clone(),
            master_port: None,
            started_ms: now_ms,
            ranks: vec![None; job.spec.world_size() as usize],
            outcome: None,
            groups: group_index(&nodes),
            reported: 0,
            // Every node is given its slots just below.
            holders: nodes.len() as u32,
            compute_ms: Vec::new(),
            stragglers: BTreeSet::new(),
            straggler_checked_ms: now_ms,
            straggling_checks: BTreeMap::new(),
            rank_exited: false,
        });
        job.placements.push(nodes.clone());
        if job.placements.len() > PLACEMENTS_KEPT {
            job.placements.remove(0);
            job.placements_from += 1;
        }
        self.dirty_jobs.insert(job_id);
        for &n in &nodes {
            self.nodes[n.index()].allocations.push(Allocation { job_id, attempt: number, slots: per_node });
            self.dirty_node(n);
        }
        self.command(nodes[0], Queued::Command(Command::ReservePort { job_id, attempt: number }));
        let message = format!("attempt {number} on {}", node_list(&self.nodes, &nodes));
        self.event(now_ms, Some(job_id), None, EventKind::Scheduled, message);
    }

    /// Where every rank of a launched attempt runs. Only the current attempt has one, and only
    /// once its MASTER_PORT is known.
    pub fn peer_table(&self, job_id: JobId, attempt: u32) -> Result<PeerTable, CoreError> {
        let job = self.jobs.get(&job_id).ok_or(CoreError::UnknownJob(job_id))?;
        let current = job.attempt.as_ref().filter(|a| a.number == attempt);
        let Some(a) = current else {
            let latest = job.attempt.as_ref().map_or("none".to_string(), |a| a.number.to_string());
            return Err(CoreError::Conflict(format!(
                "job {job_id} has no attempt {attempt} in progress (current attempt: {latest})"
            )));
        };
        let Some(master_port) = a.master_port else {
            return Err(CoreError::Conflict(format!(
                "attempt {attempt} of job {job_id} is not launched yet (no MASTER_PORT)"
            )));
        };
        let hosts: Vec<String> = a.nodes.iter().map(|n| self.nodes[n.index()].addr.clone()).collect();
        Ok(PeerTable {
            job_id,
            attempt,
            world_size: job.spec.world_size(),
            ranks_per_node: job.spec.ranks_per_node,
            master_addr: hosts[0].clone(),
            master_port,
            hosts,
        })
    }
}
