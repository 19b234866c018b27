//! The controller's Prometheus metrics, served at `/metrics` in Prometheus' text format.
//!
//! Two kinds: what the core knows now (jobs' step, loss, throughput, MFU, effective training
//! time and lost time; nodes' health, heartbeat age and slots), read under the core's lock at
//! scrape time, so there is no second copy to keep in step; and what happens over time (API
//! latency, faults by cause, recovery durations), observed by the edges as it happens. Names
//! carry base units (`_seconds`, `_ratio`) and counters end in `_total`.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicI64, AtomicU64};

use myriad_core::Core;
use proto::api::Event;
use proto::events::EventKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    /// The route's pattern (`/v1/jobs/{id}`), never the raw path: one series per route.
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabels {
    job: String,
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    job: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LostLabels {
    job: String,
    name: String,
    category: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;

fn latency_histogram() -> Histogram {
    // 0.1 ms to 3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

fn recovery_histogram() -> Histogram {
    // 50 ms to 27 min.
    Histogram::new(exponential_buckets(0.05, 2.0, 16))
}

/// Metrics observed over the controller's life (reset when it restarts, as Prometheus expects).
pub struct Metrics {
    requests: Family<RouteLabels, Histogram>,
    faults: Family<FaultLabels, Counter>,
    recovery: Family<PhaseLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::new_with_constructor(latency_histogram),
            faults: Family::default(),
            recovery: Family::new_with_constructor(recovery_histogram),
        }
    }
}

impl Metrics {
    pub fn observe_request(&self, method: &str, route: &str, seconds: f64) {
        let labels = RouteLabels { method: method.to_string(), route: route.to_string() };
        self.requests.get_or_create(&labels).observe(seconds);
    }

    /// Counts faults and recoveries from committed events: an attempt ended by a fault carries
    /// its cause, a recovery its detection, restart and recomputation seconds.
    pub fn observe_events(&self, events: &[Event]) {
        for e in events {
            let (Some(job), Some(data)) = (e.job_id, e.data.as_ref()) else { continue };
            match EventKind::parse(&e.kind) {
                Some(EventKind::AttemptFailed) => {
                    let cause = data["cause"].as_str().unwrap_or("unknown").to_string();
                    self.faults.get_or_create(&FaultLabels { job: job.to_string(), cause }).inc();
                }
                Some(EventKind::Recovered) => {
                    let phases = [
                        ("detection", "detection_s"),
                        ("restart", "restart_s"),
                        ("recomputation", "recompute_s"),
                    ];
                    let mut total = 0.0;
                    for (phase, field) in phases {
                        let Some(seconds) = data[field].as_f64() else { continue };
                        total += seconds;
                        self.recovery.get_or_create(&PhaseLabels { phase: phase.into() }).observe(seconds);
                    }
                    self.recovery.get_or_create(&PhaseLabels { phase: "total".into() }).observe(total);
                }
                _ => {}
            }
        }
    }

    /// The exposition: the core's present state and the observed metrics.
    pub fn render(&self, core: &Core, now_ms: u64) -> String {
        let mut registry = Registry::with_prefix("myriad");
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an API call, by route",
            self.requests.clone(),
        );
        registry.register("job_faults", "Attempts of a job ended by a fault, by cause", self.faults.clone());
        registry.register(
            "recovery_duration_seconds",
            "Recovery from a fault: detection, restart (stop, relaunch, restore, rendezvous), recomputation, and their total",
            self.recovery.clone(),
        );

        let jobs_by_state = Family::<StateLabels, Gauge>::default();
        let step = Family::<JobLabels, Gauge>::default();
        let loss = Family::<JobLabels, FloatGauge>::default();
        let tokens = Family::<JobLabels, FloatGauge>::default();
        let mfu = Family::<JobLabels, FloatGauge>::default();
        let ettr = Family::<JobLabels, FloatGauge>::default();
        let restarts = Family::<JobLabels, Counter>::default();
        let committed = Family::<JobLabels, FloatCounter>::default();
        let lost = Family::<LostLabels, FloatCounter>::default();
        for job in core.jobs() {
            jobs_by_state.get_or_create(&StateLabels { state: job.state.as_str().into() }).inc();
            if job.state.is_final() {
                // Ended jobs stay in the counts by state only: series for every job ever run
                // would grow without bound.
                continue;
            }
            let Some(view) = core.job_view(job.id, now_ms) else { continue };
            let labels = JobLabels { job: job.id.to_string(), name: job.spec.name.clone() };
            if let Some(s) = view.step {
                step.get_or_create(&labels).set(s as i64);
            }
            let set = |family: &Family<JobLabels, FloatGauge>, v: Option<f64>| {
                if let Some(v) = v.filter(|v| v.is_finite()) {
                    family.get_or_create(&labels).set(v);
                }
            };
            set(&loss, view.loss);
            set(&tokens, view.tokens_per_s);
            set(&mfu, view.mfu);
            set(&ettr, view.ettr);
            restarts.get_or_create(&labels).inc_by(view.restarts as u64);
            committed.get_or_create(&labels).inc_by(view.time.committed_ms / 1e3);
            let categories = [
                ("startup", view.time.startup_ms),
                ("detection", view.time.detection_ms),
                ("restart", view.time.restart_ms),
                ("recomputation", view.time.recompute_ms),
            ];
            for (category, ms) in categories {
                let labels = LostLabels {
                    job: labels.job.clone(),
                    name: labels.name.clone(),
                    category: category.into(),
                };
                lost.get_or_create(&labels).inc_by(ms.max(0.0) / 1e3);
            }
        }
        registry.register("jobs", "Jobs by state", jobs_by_state);
        registry.register("job_step", "Last step rank 0 reported ending", step);
        registry.register("job_loss", "Training loss of that step", loss);
        registry.register("job_tokens_per_second", "Training throughput", tokens);
        registry.register("job_mfu_ratio", "Model FLOPs utilisation (0 to 1)", mfu);
        registry.register(
            "job_effective_training_time_ratio",
            "Committed step time over wall time since submission (0 to 1)",
            ettr,
        );
        registry.register("job_restarts", "Restarts of the job so far", restarts);
        registry.register(
            "job_committed_step_seconds",
            "Time spent in steps that were never rolled back",
            committed,
        );
        registry.register("job_lost_seconds", "Time lost, by category", lost);

        let up = Family::<NodeLabels, Gauge>::default();
        let age = Family::<NodeLabels, FloatGauge>::default();
        let slots = Family::<NodeLabels, Gauge>::default();
        let used = Family::<NodeLabels, Gauge>::default();
        let quarantined = Family::<NodeLabels, Gauge>::default();
        for n in core.node_views(now_ms) {
            let labels = NodeLabels { node: n.name.clone() };
            up.get_or_create(&labels).set((n.health != "lost") as i64);
            if let Some(ms) = n.heartbeat_age_ms {
                age.get_or_create(&labels).set(ms as f64 / 1e3);
            }
            slots.get_or_create(&labels).set(n.slots as i64);
            used.get_or_create(&labels).set(n.slots_used as i64);
            quarantined.get_or_create(&labels).set((n.health == "quarantined") as i64);
        }
        registry.register("node_up", "1 while the node's agent heartbeats, 0 once it is lost", up);
        registry.register("node_heartbeat_age_seconds", "Time since the node's last heartbeat", age);
        registry.register("node_slots", "Accelerator slots of the node", slots);
        registry.register("node_slots_used", "Slots held by jobs", used);
        registry.register("node_quarantined", "1 while the node is kept out of scheduling", quarantined);
        let (breaker_open, stalls) = core.liveness();
        let breaker = Gauge::<i64, AtomicI64>::default();
        breaker.set(breaker_open as i64);
        registry.register(
            "node_loss_breaker_open",
            "1 while node losses are held back because too many nodes went silent at once",
            breaker,
        );
        let stalled = Counter::<u64, AtomicU64>::default();
        stalled.inc_by(stalls);
        registry.register(
            "controller_stalls",
            "Times the controller found it had not run for a heartbeat interval (nodes got a fresh grace period)",
            stalled,
        );

        let mut text = String::new();
        encode(&mut text, &registry).expect("writing to a String cannot fail");
        net::http::to_classic_text(&text)
    }
}
