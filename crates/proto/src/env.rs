//! The environment of every rank, every name in one place: torchrun's variables with torchrun's
//! meanings (DESIGN.md), and Myriad's own. The controller's core writes a node's share
//! ([`NodeEnv`]), the launch adds each rank's own three ([`crate::api::LaunchSpec::rank_env`]),
//! the agent adds what only it knows ([`AgentEnv`]); ranks read them back ([`RankEnv`]), and the
//! collectives read the rendezvous ones by the same constants.

use std::str::FromStr;

// torchrun's variables, set for every rank.
pub const RANK: &str = "RANK";
pub const LOCAL_RANK: &str = "LOCAL_RANK";
pub const WORLD_SIZE: &str = "WORLD_SIZE";
pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
pub const GROUP_RANK: &str = "GROUP_RANK";
pub const GROUP_WORLD_SIZE: &str = "GROUP_WORLD_SIZE";
pub const ROLE_RANK: &str = "ROLE_RANK";
pub const ROLE_NAME: &str = "ROLE_NAME";
pub const ROLE_WORLD_SIZE: &str = "ROLE_WORLD_SIZE";
pub const MASTER_ADDR: &str = "MASTER_ADDR";
pub const MASTER_PORT: &str = "MASTER_PORT";
pub const TORCHELASTIC_RESTART_COUNT: &str = "TORCHELASTIC_RESTART_COUNT";
pub const TORCHELASTIC_MAX_RESTARTS: &str = "TORCHELASTIC_MAX_RESTARTS";
pub const TORCHELASTIC_RUN_ID: &str = "TORCHELASTIC_RUN_ID";
pub const TORCHELASTIC_USE_AGENT_STORE: &str = "TORCHELASTIC_USE_AGENT_STORE";
/// Set for every rank; a job may choose its value (the spec's `env`).
pub const OMP_NUM_THREADS: &str = "OMP_NUM_THREADS";

// Myriad's own, set for every rank.
pub const MYRIAD_JOB_ID: &str = "MYRIAD_JOB_ID";
pub const MYRIAD_ATTEMPT: &str = "MYRIAD_ATTEMPT";
/// The agent's Unix socket for progress messages ([`crate::progress`]).
pub const MYRIAD_AGENT_SOCKET: &str = "MYRIAD_AGENT_SOCKET";
/// The job's persisted checkpoint directory on this node.
pub const MYRIAD_CHECKPOINT_DIR: &str = "MYRIAD_CHECKPOINT_DIR";
/// The job's in-memory tier on this node (tmpfs): checkpoint directories and live state.
pub const MYRIAD_MEMORY_CHECKPOINT_DIR: &str = "MYRIAD_MEMORY_CHECKPOINT_DIR";
/// In-memory checkpoint every this many steps.
pub const MYRIAD_CHECKPOINT_EVERY: &str = "MYRIAD_CHECKPOINT_EVERY";
/// A restarted rank's verified checkpoint directory, when the agent fetched one.
pub const MYRIAD_RESTORE_DIR: &str = "MYRIAD_RESTORE_DIR";
/// The step the controller chose to restart from.
pub const MYRIAD_RESTORE_STEP: &str = "MYRIAD_RESTORE_STEP";

/// The attempt's secret: Myriad's own rendezvous store and ring accept only connections that
/// present it (derived per attempt by the controller from a key only it holds).
pub const MYRIAD_COMM_SECRET: &str = "MYRIAD_COMM_SECRET";

/// Where a Python rank's stack is dumped when the agent asks (SIGUSR2, before killing a hung rank).
pub const MYRIAD_STACK_FILE: &str = "MYRIAD_STACK_FILE";

/// The GPU a rank is bound to: its NVML index and UUID (set on GPU nodes).
pub const MYRIAD_GPU_INDEX: &str = "MYRIAD_GPU_INDEX";
pub const MYRIAD_GPU_UUID: &str = "MYRIAD_GPU_UUID";

// Defaults the agent sets on GPU nodes unless the job's `env` sets them.
pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";
pub const CUDA_DEVICE_ORDER: &str = "CUDA_DEVICE_ORDER";
pub const TORCH_NCCL_ASYNC_ERROR_HANDLING: &str = "TORCH_NCCL_ASYNC_ERROR_HANDLING";
pub const TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC: &str = "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC";
/// The interface PyTorch's Gloo backend binds: the agent names the one holding its address.
pub const GLOO_SOCKET_IFNAME: &str = "GLOO_SOCKET_IFNAME";

// Knobs a job may set in its spec's `env`.
/// Deadline of every collective, in seconds.
pub const MYRIAD_COMM_TIMEOUT_S: &str = "MYRIAD_COMM_TIMEOUT_S";
/// `0` turns the shared-memory rings between ranks of one host off.
pub const MYRIAD_COMM_SHM: &str = "MYRIAD_COMM_SHM";
/// `0` turns the trainer's live state off (restarts then use checkpoint directories alone).
pub const MYRIAD_LIVE_STATE: &str = "MYRIAD_LIVE_STATE";

/// `0` keeps the agent's Python package (progress hook, stack dumps) off the ranks' PYTHONPATH.
pub const MYRIAD_PYTHON_HOOK: &str = "MYRIAD_PYTHON_HOOK";
/// FLOP/s of one rank's device, for the MFU `myriad.report` computes.
pub const MYRIAD_PEAK_FLOPS: &str = "MYRIAD_PEAK_FLOPS";
/// Python's module path: the agent puts its package first (a job's own value is kept after it).
pub const PYTHONPATH: &str = "PYTHONPATH";

// The command line's, never a rank's.
pub const MYRIAD_CONTROLLER: &str = "MYRIAD_CONTROLLER";
pub const MYRIAD_CLUSTER: &str = "MYRIAD_CLUSTER";
pub const MYRIAD_TOKEN: &str = "MYRIAD_TOKEN";

/// Variables Myriad sets for every rank; a job may not set them itself.
pub const RESERVED: &[&str] = &[
    RANK,
    LOCAL_RANK,
    WORLD_SIZE,
    LOCAL_WORLD_SIZE,
    GROUP_RANK,
    GROUP_WORLD_SIZE,
    ROLE_RANK,
    ROLE_NAME,
    ROLE_WORLD_SIZE,
    MASTER_ADDR,
    MASTER_PORT,
    TORCHELASTIC_RESTART_COUNT,
    TORCHELASTIC_MAX_RESTARTS,
    TORCHELASTIC_RUN_ID,
    TORCHELASTIC_USE_AGENT_STORE,
    MYRIAD_JOB_ID,
    MYRIAD_ATTEMPT,
    MYRIAD_COMM_SECRET,
    MYRIAD_AGENT_SOCKET,
    MYRIAD_CHECKPOINT_DIR,
    MYRIAD_MEMORY_CHECKPOINT_DIR,
    MYRIAD_CHECKPOINT_EVERY,
    MYRIAD_RESTORE_DIR,
    MYRIAD_RESTORE_STEP,
    MYRIAD_GPU_INDEX,
    MYRIAD_GPU_UUID,
    MYRIAD_STACK_FILE,
];

/// What the controller's core sets for every rank of one node: all of torchrun's variables but
/// the three each rank has of its own, and the job's identity. Sent once per node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeEnv {
    pub world_size: u32,
    pub local_world_size: u32,
    pub group_rank: u32,
    pub group_world_size: u32,
    pub role_name: String,
    pub master_addr: String,
    pub master_port: u16,
    pub restart_count: u32,
    pub max_restarts: u32,
    pub run_id: String,
    /// Whether a store already serves on MASTER_PORT (torchrun's agent store). Myriad's agent
    /// does not speak PyTorch's store protocol, so rank 0 hosts it: always false today.
    pub use_agent_store: bool,
    pub omp_num_threads: String,
    pub job_id: u64,
    pub attempt: u32,
    /// [`comm_secret`] of the attempt.
    pub comm_secret: String,
}

/// The secret of attempt `attempt` of job `job_id` under the controller's `key`: 64 hex digits,
/// unguessable without the key, the same on every node of the attempt, new for every attempt.
pub fn comm_secret(key: &[u8; 32], job_id: u64, attempt: u32) -> String {
    let mut input = key.to_vec();
    input.extend_from_slice(&job_id.to_le_bytes());
    input.extend_from_slice(&attempt.to_le_bytes());
    crate::checkpoint::sha256_hex(&input)
}

impl NodeEnv {
    pub fn vars(&self) -> Vec<(String, String)> {
        let store = if self.use_agent_store { "True" } else { "False" };
        [
            (WORLD_SIZE, self.world_size.to_string()),
            (LOCAL_WORLD_SIZE, self.local_world_size.to_string()),
            (GROUP_RANK, self.group_rank.to_string()),
            (GROUP_WORLD_SIZE, self.group_world_size.to_string()),
            (ROLE_NAME, self.role_name.clone()),
            // One role: its world is the job's.
            (ROLE_WORLD_SIZE, self.world_size.to_string()),
            (MASTER_ADDR, self.master_addr.clone()),
            (MASTER_PORT, self.master_port.to_string()),
            (TORCHELASTIC_RESTART_COUNT, self.restart_count.to_string()),
            (TORCHELASTIC_MAX_RESTARTS, self.max_restarts.to_string()),
            (TORCHELASTIC_RUN_ID, self.run_id.clone()),
            (TORCHELASTIC_USE_AGENT_STORE, store.to_string()),
            (OMP_NUM_THREADS, self.omp_num_threads.clone()),
            (MYRIAD_JOB_ID, self.job_id.to_string()),
            (MYRIAD_ATTEMPT, self.attempt.to_string()),
            (MYRIAD_COMM_SECRET, self.comm_secret.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// Each rank's own three: RANK, LOCAL_RANK and ROLE_RANK (its global rank again: one role).
pub fn rank_vars(group_rank: u32, ranks_per_node: u32, local_rank: u32) -> [(String, String); 3] {
    let rank = (group_rank * ranks_per_node + local_rank).to_string();
    [(RANK.into(), rank.clone()), (LOCAL_RANK.into(), local_rank.to_string()), (ROLE_RANK.into(), rank)]
}

/// What the agent adds for the ranks it launches: where its socket and the job's checkpoint tiers
/// are on this node, and where a restart starts from. Written by the agent, read by the ranks.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentEnv {
    pub agent_socket: String,
    pub checkpoint_dir: String,
    pub memory_checkpoint_dir: String,
    pub checkpoint_every: u64,
    pub restore_dir: Option<String>,
    pub restore_step: Option<u64>,
}

impl AgentEnv {
    pub fn vars(&self) -> Vec<(String, String)> {
        let mut vars = vec![
            (MYRIAD_AGENT_SOCKET.to_string(), self.agent_socket.clone()),
            (MYRIAD_CHECKPOINT_DIR.to_string(), self.checkpoint_dir.clone()),
            (MYRIAD_MEMORY_CHECKPOINT_DIR.to_string(), self.memory_checkpoint_dir.clone()),
            (MYRIAD_CHECKPOINT_EVERY.to_string(), self.checkpoint_every.to_string()),
        ];
        if let Some(dir) = &self.restore_dir {
            vars.push((MYRIAD_RESTORE_DIR.to_string(), dir.clone()));
        }
        if let Some(step) = self.restore_step {
            vars.push((MYRIAD_RESTORE_STEP.to_string(), step.to_string()));
        }
        vars
    }
}

/// What a rank reads of its environment. Absent variables are None (a process run by hand); a
/// variable that is set but malformed is an error naming it.
#[derive(Clone, Debug, PartialEq)]
pub struct RankEnv {
    pub job_id: Option<u64>,
    pub attempt: Option<u32>,
    /// 0 when unset.
    pub local_rank: u32,
    pub agent_socket: Option<String>,
    /// The in-memory tier, when an agent offers one, with its checkpoint period (default 1).
    pub memory_checkpoint_dir: Option<String>,
    pub checkpoint_every: u64,
    pub restore_dir: Option<String>,
    pub restore_step: Option<u64>,
    /// False only when MYRIAD_LIVE_STATE is `0`.
    pub live_state: bool,
}

impl RankEnv {
    /// Reads this process's environment.
    pub fn from_process() -> Result<RankEnv, String> {
        RankEnv::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<RankEnv, String> {
        let checkpoint_every: Option<u64> = parse(&get, MYRIAD_CHECKPOINT_EVERY)?;
        if checkpoint_every == Some(0) {
            return Err(format!("{MYRIAD_CHECKPOINT_EVERY}=0 is not a positive integer"));
        }
        Ok(RankEnv {
            job_id: parse(&get, MYRIAD_JOB_ID)?,
            attempt: parse(&get, MYRIAD_ATTEMPT)?,
            local_rank: parse(&get, LOCAL_RANK)?.unwrap_or(0),
            agent_socket: get(MYRIAD_AGENT_SOCKET),
            memory_checkpoint_dir: get(MYRIAD_MEMORY_CHECKPOINT_DIR),
            checkpoint_every: checkpoint_every.unwrap_or(1),
            restore_dir: get(MYRIAD_RESTORE_DIR),
            restore_step: parse(&get, MYRIAD_RESTORE_STEP)?,
            live_state: get(MYRIAD_LIVE_STATE).is_none_or(|v| v.trim() != "0"),
        })
    }
}

/// `name`'s value parsed as `T`; None when unset, an error naming the variable when malformed.
pub fn parse<T: FromStr>(get: impl Fn(&str) -> Option<String>, name: &str) -> Result<Option<T>, String> {
    match get(name) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            format!(
                "{name}={v:?} is not a valid {}",
                std::any::type_name::<T>().rsplit("::").next().unwrap_or("value")
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn lookup(vars: Vec<(String, String)>) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = vars.into_iter().collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn what_the_core_and_the_agent_write_a_rank_reads_back() {
        let node = NodeEnv {
            world_size: 8,
            local_world_size: 4,
            group_rank: 1,
            group_world_size: 2,
            role_name: "default".into(),
            master_addr: "10.0.0.1".into(),
            master_port: 29_001,
            restart_count: 2,
            max_restarts: 3,
            run_id: "myriad-7".into(),
            use_agent_store: false,
            omp_num_threads: "1".into(),
            job_id: 7,
            attempt: 2,
            comm_secret: comm_secret(&[9; 32], 7, 2),
        };
        let agent = AgentEnv {
            agent_socket: "/run/agent.sock".into(),
            checkpoint_dir: "/ckpt/job-7".into(),
            memory_checkpoint_dir: "/dev/shm/job-7".into(),
            checkpoint_every: 5,
            restore_dir: None,
            restore_step: Some(40),
        };
        let mut vars = node.vars();
        vars.extend(rank_vars(1, 4, 3));
        vars.extend(agent.vars());
        let names: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
        for name in RESERVED.iter().filter(|n| {
            ![MYRIAD_RESTORE_DIR, MYRIAD_GPU_INDEX, MYRIAD_GPU_UUID, MYRIAD_STACK_FILE].contains(n)
        }) {
            assert!(names.contains(name), "{name} is not set for a restarted rank");
        }
        let get = lookup(vars);
        assert_eq!(
            (get(RANK), get(ROLE_RANK), get(TORCHELASTIC_USE_AGENT_STORE)),
            (Some("7".into()), Some("7".into()), Some("False".into()))
        );
        let env = RankEnv::from_lookup(get).unwrap();
        assert_eq!((env.job_id, env.attempt, env.local_rank), (Some(7), Some(2), 3));
        assert_eq!(env.agent_socket.as_deref(), Some("/run/agent.sock"));
        assert_eq!((env.checkpoint_every, env.restore_step, env.live_state), (5, Some(40), true));
    }

    #[test]
    fn each_attempt_has_its_own_secret_and_only_the_key_gives_it() {
        let key = [7u8; 32];
        let s = comm_secret(&key, 1, 0);
        assert_eq!(s.len(), 64);
        assert_eq!(s, comm_secret(&key, 1, 0), "every node of an attempt derives the same");
        assert_ne!(s, comm_secret(&key, 1, 1), "a restart gets a new one");
        assert_ne!(s, comm_secret(&key, 2, 0));
        assert_ne!(s, comm_secret(&[8u8; 32], 1, 0), "another controller's key gives another");
    }

    #[test]
    fn a_malformed_variable_is_an_error_naming_it() {
        let get = lookup(vec![(MYRIAD_RESTORE_STEP.into(), "soon".into())]);
        let e = RankEnv::from_lookup(get).unwrap_err();
        assert!(e.contains("MYRIAD_RESTORE_STEP=\"soon\""), "{e}");
        let get = lookup(vec![(MYRIAD_CHECKPOINT_EVERY.into(), "0".into())]);
        assert!(RankEnv::from_lookup(get).unwrap_err().contains(MYRIAD_CHECKPOINT_EVERY));
        let none = RankEnv::from_lookup(|_| None).unwrap();
        assert_eq!(
            (none.job_id, none.local_rank, none.checkpoint_every, none.live_state),
            (None, 0, 1, true)
        );
    }
}
