//! What the controller's state costs: the core's live heap for a 1,250-node cluster and a
//! 10,000-rank job, counted by a global allocator (deterministic, unlike resident memory), and
//! proof that restarting the job again and again does not grow it.

use myriad_core::{Core, CoreConfig};
use proto::api::{Command, HeartbeatRequest, PortReport, RankReport, RankState, RegisterRequest};
use proto::spec::JobSpec;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

const NODES: u32 = 1250;
const SLOTS: u32 = 8;

fn name(i: u32) -> String {
    format!("node-{i:05}")
}

/// Every node heartbeats what it holds: ports it reserved, ranks of the launches it was sent
/// (running, or exited once told to stop), acknowledging every command. One round.
fn heartbeat_all(
    core: &mut Core,
    now_ms: u64,
    ports: &mut Vec<(u32, PortReport)>,
    ranks: &mut [Vec<RankReport>],
) {
    for i in 0..NODES {
        let n = name(i);
        let id = core.node_id(&n).expect("registered");
        let node = core.node_by_id(id);
        let acked = node.commands.back().map_or(0, |c| c.seq);
        let commands: Vec<Command> = node.commands.iter().map(|c| c.to_wire().command).collect();
        let held = &mut ranks[i as usize];
        for c in commands {
            match c {
                Command::ReservePort { job_id, attempt } => {
                    ports.push((i, PortReport { job_id, attempt, port: 20_000 + attempt as u16 }))
                }
                Command::Launch(l) => {
                    held.retain(|r| r.attempt == l.attempt);
                    for local in l.local_ranks() {
                        if !held.iter().any(|r| r.local_rank == local) {
                            held.push(rank(l.job_id, l.attempt, local, RankState::Running { pid: 1 }));
                        }
                    }
                }
                Command::Stop { attempt, .. } => {
                    for r in held.iter_mut().filter(|r| r.attempt == attempt) {
                        r.state = RankState::Exited { code: None, signal: Some(15) };
                    }
                }
                Command::Forget { attempt, .. } => held.retain(|r| r.attempt != attempt),
                Command::Purge { .. } => {}
            }
        }
        let req = HeartbeatRequest {
            acked_command_seq: acked,
            ranks: held.clone(),
            ports: ports.iter().filter(|(p, _)| *p == i).map(|(_, p)| p.clone()).collect(),
            ..HeartbeatRequest::default()
        };
        core.report(id, &req, now_ms);
    }
    // A report is state: a port once reported need not be repeated after its launch.
    ports.clear();
}

fn rank(job_id: u64, attempt: u32, local_rank: u32, state: RankState) -> RankReport {
    RankReport::new((job_id, attempt, local_rank), state)
}

#[test]
fn the_cores_state_per_node_and_per_rank_is_small_and_restarts_do_not_grow_it() {
    let empty = live();
    let mut core = Core::new(CoreConfig::default());
    let mut now_ms = 1_000;
    for i in 0..NODES {
        let req = RegisterRequest {
            name: name(i),
            slots: SLOTS,
            cores: 64,
            addr: format!("10.0.{}.{}", i / 250, i % 250),
            http_port: 8080,
            spare: false,
            gpus: Vec::new(),
            driver: None,
        };
        core.register(req, now_ms).unwrap();
    }
    drop(core.take_changes());
    let with_nodes = live();
    let per_node = (with_nodes - empty) as f64 / NODES as f64;

    let spec = JobSpec::from_toml(&format!(
        "name = \"big\"\nargv = [\"python\", \"train.py\"]\nnodes = {NODES}\nranks_per_node = {SLOTS}\nmax_restarts = 1000\n"
    ))
    .unwrap();
    let id = core.submit(spec, now_ms).unwrap();
    let mut ports = Vec::new();
    let mut ranks = vec![Vec::new(); NODES as usize];
    let running =
        |core: &mut Core, now_ms: &mut u64, ranks: &mut Vec<Vec<RankReport>>, ports: &mut Vec<_>| {
            for _ in 0..4 {
                *now_ms += 10;
                heartbeat_all(core, *now_ms, ports, ranks);
                drop(core.take_changes());
            }
        };
    running(&mut core, &mut now_ms, &mut ranks, &mut ports);
    assert_eq!(core.job_view(id, now_ms).unwrap().state, "running");
    let ranks_total = (NODES * SLOTS) as f64;
    // The simulated agents' own rank lists are not the core's.
    let harness = |ranks: &Vec<Vec<RankReport>>| {
        (ranks.capacity() * std::mem::size_of::<Vec<RankReport>>()
            + ranks.iter().map(|v| v.capacity() * std::mem::size_of::<RankReport>()).sum::<usize>())
            as isize
    };
    let with_job = live() - harness(&ranks);
    let per_rank = (with_job - with_nodes) as f64 / ranks_total;

    // Restart the job 40 times (a rank of the leader exits 1 each time): placements, events and
    // command queues must not accumulate.
    let mut after_restarts = Vec::new();
    for restart in 0..40u32 {
        now_ms += 10;
        let mut req = HeartbeatRequest {
            acked_command_seq: core.node(&name(0)).unwrap().next_command_seq,
            ..Default::default()
        };
        let mut crashed = rank(id, restart, 0, RankState::Exited { code: Some(1), signal: None });
        crashed.exited_at_ms = Some(now_ms);
        req.ranks.push(crashed);
        core.report(core.node_id(&name(0)).unwrap(), &req, now_ms);
        running(&mut core, &mut now_ms, &mut ranks, &mut ports);
        core.tick(now_ms);
        running(&mut core, &mut now_ms, &mut ranks, &mut ports);
        let view = core.job_view(id, now_ms).unwrap();
        assert_eq!((view.state.as_str(), view.attempt), ("running", restart + 1), "{view:?}");
        after_restarts.push(live() - harness(&ranks));
    }
    let grown = after_restarts[39] - after_restarts[19];
    eprintln!(
        "core state: {per_node:.0} bytes per node, {per_rank:.0} bytes per rank; {} bytes after 20 more restarts",
        grown
    );
    assert!(per_node < 1024.0, "{per_node} bytes per node");
    assert!(per_rank < 128.0, "{per_rank} bytes per rank");
    // Bounded: after the placements window filled (16 attempts), more restarts add nothing
    // beyond the job's fixed-size ledger noise.
    assert!(grown.abs() < 64 * 1024, "20 more restarts grew the core by {grown} bytes");
}
