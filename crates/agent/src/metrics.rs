//! The agent's Prometheus metrics, served at its `/metrics` in Prometheus' text format: its
//! ranks (read at scrape time), heartbeats to the controller, checkpoint copies (to the buddy
//! node and to the persisted tier: seconds and bytes) and hung ranks it killed.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    /// `buddy` (a copy on another node's memory) or `persisted` (the checkpoint directory).
    tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    gpu: String,
    uuid: String,
    model: String,
}

pub struct AgentMetrics {
    heartbeat: Histogram,
    heartbeat_failures: Counter,
    copy_seconds: Family<TierLabels, Histogram>,
    copy_bytes: Family<TierLabels, Counter>,
    hangs: Counter,
    fenced: Counter,
}

fn copy_histogram() -> Histogram {
    // 1 ms to 33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            heartbeat: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            heartbeat_failures: Counter::default(),
            copy_seconds: Family::new_with_constructor(copy_histogram),
            copy_bytes: Family::default(),
            hangs: Counter::default(),
            fenced: Counter::default(),
        }
    }
}

impl AgentMetrics {
    pub fn heartbeat(&self, seconds: f64, ok: bool) {
        if ok {
            self.heartbeat.observe(seconds);
        } else {
            self.heartbeat_failures.inc();
        }
    }

    pub fn checkpoint_copied(&self, tier: &str, seconds: f64, bytes: u64) {
        let labels = TierLabels { tier: tier.to_string() };
        self.copy_seconds.get_or_create(&labels).observe(seconds);
        self.copy_bytes.get_or_create(&labels).inc_by(bytes);
    }

    pub fn hang_killed(&self) {
        self.hangs.inc();
    }

    pub fn fenced(&self, ranks: usize) {
        self.fenced.inc_by(ranks as u64);
    }

    /// The exposition, with the ranks this agent holds (`running`, `exited`) and its GPUs.
    pub fn render(&self, running: usize, exited: usize, gpus: &crate::gpu::Monitor) -> String {
        let mut registry = Registry::with_prefix("myriad_agent");
        let ranks = Family::<StateLabels, Gauge>::default();
        ranks.get_or_create(&StateLabels { state: "running".into() }).set(running as i64);
        ranks.get_or_create(&StateLabels { state: "exited".into() }).set(exited as i64);
        registry.register("ranks", "Ranks this agent holds, by state", ranks);
        registry.register(
            "heartbeat_duration_seconds",
            "Time for the controller to answer a heartbeat",
            self.heartbeat.clone(),
        );
        registry.register(
            "heartbeat_failures",
            "Heartbeats the controller did not answer",
            self.heartbeat_failures.clone(),
        );
        registry.register(
            "checkpoint_copy_seconds",
            "Time to copy an in-memory checkpoint, by tier",
            self.copy_seconds.clone(),
        );
        registry.register(
            "checkpoint_copy_bytes",
            "Checkpoint bytes copied, by tier",
            self.copy_bytes.clone(),
        );
        registry.register("hung_ranks_killed", "Ranks found without progress and killed", self.hangs.clone());
        registry.register(
            "fenced_ranks_killed",
            "Ranks killed because the controller was out of reach for the fencing lease",
            self.fenced.clone(),
        );
        register_gpus(&mut registry, gpus);
        let mut text = String::new();
        encode(&mut text, &registry).expect("writing to a String cannot fail");
        net::http::to_classic_text(&text)
    }
}

/// Per GPU: its latest sample and its health (1 while no check finds it failed; warnings counted).
fn register_gpus(registry: &mut Registry, gpus: &crate::gpu::Monitor) {
    type Ratio = Gauge<f64, AtomicU64>;
    let util = Family::<GpuLabels, Ratio>::default();
    let memory = Family::<GpuLabels, Gauge>::default();
    let power = Family::<GpuLabels, Ratio>::default();
    let temperature = Family::<GpuLabels, Ratio>::default();
    let healthy = Family::<GpuLabels, Gauge>::default();
    let warnings = Family::<GpuLabels, Gauge>::default();
    let findings = gpus.health.findings();
    for (i, g) in gpus.gpus.iter().enumerate() {
        let labels = GpuLabels { gpu: g.index.to_string(), uuid: g.uuid.clone(), model: g.model.clone() };
        if let Some(s) = gpus.samples.get(i) {
            if let Some(v) = s.utilization_pct {
                util.get_or_create(&labels).set(v / 100.0);
            }
            if let Some(v) = s.memory_used_mib {
                memory.get_or_create(&labels).set((v << 20) as i64);
            }
            if let Some(v) = s.power_w {
                power.get_or_create(&labels).set(v);
            }
            if let Some(v) = s.temperature_c {
                temperature.get_or_create(&labels).set(v);
            }
        }
        let mine = findings.iter().filter(|f| f.index == g.index);
        let (fatal, warn) = mine.fold((0, 0), |(f, w), x| if x.fatal { (f + 1, w) } else { (f, w + 1) });
        healthy.get_or_create(&labels).set((fatal == 0) as i64);
        warnings.get_or_create(&labels).set(warn);
    }
    registry.register("gpu_utilization_ratio", "Share of the last sample period a kernel ran, per GPU", util);
    registry.register("gpu_memory_used_bytes", "GPU memory in use", memory);
    registry.register("gpu_power_watts", "GPU power draw", power);
    registry.register("gpu_temperature_celsius", "GPU die temperature", temperature);
    registry.register("gpu_healthy", "1 while no health check finds the GPU failed", healthy);
    registry.register("gpu_warnings", "Warnings the GPU's latest checks found (throttling, XIDs)", warnings);
}

/// Bytes of the files directly in `dir` (a checkpoint step directory is flat).
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
        })
        .unwrap_or(0)
}
