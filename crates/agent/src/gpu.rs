//! The node's GPUs: discovery (count, model, memory, driver, UUIDs, bus ids), each rank's binding,
//! and health checks before every launch and every few seconds while ranks run. Behind
//! [`GpuBackend`]: NVML loaded at run time ([`Nvml`], so the agent builds and runs where no driver
//! exists), or a file describing GPUs and their faults ([`FakeGpus`], for tests and demos).
//!
//! What a check finds ([`assess`]) is the same for both backends: a fatal finding (an XID that
//! means the GPU needs a reset or is gone, uncorrectable ECC errors, pages pending retirement, a
//! GPU off the bus) fails the node's ranks at once and takes it out of scheduling; a warning
//! (throttling, an XID an application can cause) is reported. A fatal XID is an event, not a
//! condition: the agent keeps it until it restarts (an operator's repair), where a condition
//! clears as soon as a check passes.

use proto::api::{GpuFinding, GpuInfo};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What discovery found.
#[derive(Clone, Debug, PartialEq)]
pub struct Inventory {
    pub driver: String,
    pub gpus: Vec<GpuInfo>,
}

/// One GPU at one check. Figures a GPU cannot give are None.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct GpuSample {
    pub utilization_pct: Option<f64>,
    pub memory_used_mib: Option<u64>,
    pub power_w: Option<f64>,
    pub temperature_c: Option<f64>,
    /// Critical XID errors reported since the previous check.
    pub xids: Vec<u64>,
    /// Uncorrectable ECC errors since the driver loaded.
    pub ecc_uncorrected: u64,
    pub pages_pending_retirement: bool,
    /// Fallen off the bus, or otherwise unreachable.
    pub lost: bool,
    /// Why clocks are held down by the hardware: `thermal`, `power`.
    pub throttle: Vec<String>,
}

pub trait GpuBackend: Send {
    fn inventory(&self) -> &Inventory;
    /// One sample per GPU of the inventory, in its order.
    fn sample(&mut self) -> Result<Vec<GpuSample>, String>;
}

/// XIDs after which a GPU needs a reset or is gone (NVIDIA's XID catalogue); any other XID is a
/// warning, as an application can cause it (13, 31, 43, 45: its own faults).
const FATAL_XIDS: &[(u64, &str)] = &[
    (48, "double-bit ECC error"),
    (61, "internal micro-controller breakpoint"),
    (62, "internal micro-controller halt"),
    (64, "row remapping failure"),
    (74, "NVLink error"),
    (79, "GPU has fallen off the bus"),
    (95, "uncontained ECC error"),
    (119, "GSP RPC timeout"),
    (120, "GSP error"),
    (140, "unrecovered ECC error"),
];

/// What one sample of `gpu` shows.
pub fn assess(gpu: &GpuInfo, s: &GpuSample) -> Vec<GpuFinding> {
    let finding =
        |fatal: bool, reason: String| GpuFinding { index: gpu.index, uuid: gpu.uuid.clone(), fatal, reason };
    let mut out = Vec::new();
    for &xid in &s.xids {
        out.push(match FATAL_XIDS.iter().find(|(x, _)| *x == xid) {
            Some((_, what)) => finding(true, format!("XID {xid} ({what})")),
            None => finding(false, format!("XID {xid}")),
        });
    }
    if s.lost {
        out.push(finding(true, "unreachable (fallen off the bus)".into()));
    }
    if s.ecc_uncorrected > 0 {
        // No count in the reason: a count that grows is the same fault, not a new one.
        out.push(finding(true, "uncorrectable ECC errors".into()));
    }
    if s.pages_pending_retirement {
        out.push(finding(true, "memory pages pending retirement (needs a GPU reset)".into()));
    }
    if !s.throttle.is_empty() {
        out.push(finding(false, format!("throttled ({})", s.throttle.join(", "))));
    }
    out
}

/// The node's GPU health over time: fatal XIDs are kept (see the module's note), everything else
/// is what the latest check shows.
#[derive(Default)]
pub struct Health {
    latched: BTreeSet<GpuFinding>,
    current: Vec<GpuFinding>,
}

impl Health {
    /// Takes one check's findings; returns the fatal ones that are new.
    pub fn update(&mut self, findings: Vec<GpuFinding>) -> Vec<GpuFinding> {
        let before: BTreeSet<GpuFinding> = self.findings().into_iter().filter(|f| f.fatal).collect();
        for f in findings.iter().filter(|f| f.fatal && f.reason.starts_with("XID ")) {
            self.latched.insert(f.clone());
        }
        self.current = findings;
        self.findings().into_iter().filter(|f| f.fatal && !before.contains(f)).collect()
    }

    /// Everything found now, sorted, each once: what the heartbeat reports.
    pub fn findings(&self) -> Vec<GpuFinding> {
        let all: BTreeSet<GpuFinding> = self.latched.iter().chain(&self.current).cloned().collect();
        all.into_iter().collect()
    }
}

/// The GPUs a launch of `ranks` local ranks gets: the lowest-numbered ones no running rank of
/// another attempt holds, one per local rank in LOCAL_RANK order. None when too few are free.
pub fn bind(gpus: &[GpuInfo], busy: &BTreeSet<u32>, ranks: u32) -> Option<Vec<GpuInfo>> {
    let free: Vec<GpuInfo> =
        gpus.iter().filter(|g| !busy.contains(&g.index)).take(ranks as usize).cloned().collect();
    (free.len() == ranks as usize).then_some(free)
}

/// The environment of local rank `local` of a launch bound to `bound`: the rank's own GPU by index
/// and UUID, and the defaults a cluster sets, each of which the job's own `env` overrides. CUDA
/// sees the launch's GPUs in LOCAL_RANK order (so `cuda:LOCAL_RANK` is the rank's own, as
/// unmodified scripts expect) numbered by PCI bus as NVML numbers them; NCCL errors fail fast; the
/// watchdog's heartbeat timeout is 2 minutes, not 8, since Myriad's own hang detection acts in
/// seconds.
pub fn rank_env(bound: &[GpuInfo], local: u32, job_env: &[(String, String)]) -> Vec<(String, String)> {
    use proto::env::*;
    let visible: Vec<String> = bound.iter().map(|g| g.index.to_string()).collect();
    let own = &bound[local as usize];
    let mut env = vec![
        (MYRIAD_GPU_INDEX.to_string(), own.index.to_string()),
        (MYRIAD_GPU_UUID.to_string(), own.uuid.clone()),
    ];
    let defaults = [
        (CUDA_VISIBLE_DEVICES, visible.join(",")),
        (CUDA_DEVICE_ORDER, "PCI_BUS_ID".to_string()),
        (TORCH_NCCL_ASYNC_ERROR_HANDLING, "1".to_string()),
        (TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC, "120".to_string()),
    ];
    for (name, value) in defaults {
        if !job_env.iter().any(|(k, _)| k == name) {
            env.push((name.to_string(), value));
        }
    }
    env
}

/// Finds the node's GPUs: the fake file when one is named, else NVML. Err says why there are no
/// GPUs to manage (no driver on this node, say): the agent then runs with `--slots` as given.
pub fn open(fake: Option<&Path>) -> Result<Box<dyn GpuBackend>, String> {
    match fake {
        Some(path) => Ok(Box::new(FakeGpus::open(path)?)),
        None => Ok(Box::new(Nvml::open()?)),
    }
}

/// GPUs described by a JSON file, re-read at every check so a test can change a GPU's health:
/// `{"driver": "...", "gpus": [{"uuid", "bus_id", "model", "memory_mib", ...sample fields}]}`.
pub struct FakeGpus {
    path: PathBuf,
    inventory: Inventory,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FakeFile {
    driver: String,
    gpus: Vec<FakeGpu>,
}

#[derive(Deserialize)]
struct FakeGpu {
    uuid: String,
    bus_id: String,
    model: String,
    memory_mib: u64,
    #[serde(flatten)]
    sample: GpuSample,
}

impl FakeGpus {
    pub fn open(path: &Path) -> Result<FakeGpus, String> {
        let file = read_fake(path)?;
        let gpus = file
            .gpus
            .iter()
            .enumerate()
            .map(|(i, g)| GpuInfo {
                index: i as u32,
                uuid: g.uuid.clone(),
                bus_id: g.bus_id.clone(),
                model: g.model.clone(),
                memory_mib: g.memory_mib,
            })
            .collect();
        Ok(FakeGpus { path: path.to_path_buf(), inventory: Inventory { driver: file.driver, gpus } })
    }
}

/// The fields a fake GPU may have: a misspelt one (`"xid"`) would inject nothing, silently.
const FAKE_GPU_FIELDS: &[&str] = &[
    "uuid",
    "bus_id",
    "model",
    "memory_mib",
    "utilization_pct",
    "memory_used_mib",
    "power_w",
    "temperature_c",
    "xids",
    "ecc_uncorrected",
    "pages_pending_retirement",
    "lost",
    "throttle",
];

fn read_fake(path: &Path) -> Result<FakeFile, String> {
    let bad = |e: String| format!("fake GPUs {}: {e}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    for (i, gpu) in value["gpus"].as_array().into_iter().flatten().enumerate() {
        if let Some(key) = gpu
            .as_object()
            .into_iter()
            .flat_map(|o| o.keys())
            .find(|k| !FAKE_GPU_FIELDS.contains(&k.as_str()))
        {
            return Err(bad(format!("GPU {i} has an unknown field {key:?}")));
        }
    }
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

impl GpuBackend for FakeGpus {
    fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    fn sample(&mut self) -> Result<Vec<GpuSample>, String> {
        let file = read_fake(&self.path)?;
        if file.gpus.len() != self.inventory.gpus.len() {
            return Err(format!("fake GPUs {}: the number of GPUs changed", self.path.display()));
        }
        Ok(file.gpus.into_iter().map(|g| g.sample).collect())
    }
}

/// NVML, loaded at run time from libnvidia-ml.so.1.
pub struct Nvml {
    nvml: &'static nvml_wrapper::Nvml,
    /// Critical XID events, a set per GPU (None for a GPU that offers none: its other checks
    /// still run, and so do the other GPUs' events).
    events: Vec<Option<nvml_wrapper::EventSet<'static>>>,
    inventory: Inventory,
}

impl Nvml {
    pub fn open() -> Result<Nvml, String> {
        use nvml_wrapper::bitmasks::event::EventTypes;
        let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML: {e}"))?;
        // The agent holds NVML for its whole life; event sets borrow it.
        let nvml: &'static nvml_wrapper::Nvml = Box::leak(Box::new(nvml));
        let driver = nvml.sys_driver_version().map_err(|e| format!("NVML driver version: {e}"))?;
        let count = nvml.device_count().map_err(|e| format!("NVML device count: {e}"))?;
        let mut gpus = Vec::new();
        let mut events = Vec::new();
        for index in 0..count {
            let d = nvml.device_by_index(index).map_err(|e| format!("NVML GPU {index}: {e}"))?;
            let info = GpuInfo {
                index,
                uuid: d.uuid().map_err(|e| format!("NVML GPU {index} UUID: {e}"))?,
                bus_id: d.pci_info().map(|p| p.bus_id).unwrap_or_default(),
                model: d.name().unwrap_or_else(|_| "unknown GPU".into()),
                memory_mib: d.memory_info().map(|m| m.total >> 20).unwrap_or(0),
            };
            let supported =
                d.supported_event_types().is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR));
            let set = supported
                .then(|| nvml.create_event_set().ok())
                .flatten()
                .and_then(|set| d.register_events(EventTypes::CRITICAL_XID_ERROR, set).ok());
            if set.is_none() {
                say!("agent: GPU {index} ({}) reports no XID events: its other checks still run", info.uuid);
            }
            events.push(set);
            gpus.push(info);
        }
        Ok(Nvml { nvml, events, inventory: Inventory { driver, gpus } })
    }
}

impl GpuBackend for Nvml {
    fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    fn sample(&mut self) -> Result<Vec<GpuSample>, String> {
        use nvml_wrapper::bitmasks::device::ThrottleReasons;
        use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
        use nvml_wrapper::enums::event::XidError;
        use nvml_wrapper::error::NvmlError;
        let mut samples = vec![GpuSample::default(); self.inventory.gpus.len()];
        // Drain the XID events that arrived since the last check (never waiting).
        for (i, set) in self.events.iter().enumerate() {
            let Some(set) = set else { continue };
            for _ in 0..64 {
                let Ok(event) = set.wait(0) else { break };
                if let Some(XidError::Value(xid)) = event.event_data {
                    samples[i].xids.push(xid);
                }
            }
        }
        for (g, s) in self.inventory.gpus.iter().zip(samples.iter_mut()) {
            let d = match self.nvml.device_by_index(g.index) {
                Ok(d) => d,
                Err(NvmlError::GpuLost) => {
                    s.lost = true;
                    continue;
                }
                Err(e) => return Err(format!("NVML GPU {}: {e}", g.index)),
            };
            if matches!(d.uuid(), Err(NvmlError::GpuLost)) {
                s.lost = true;
                continue;
            }
            s.utilization_pct = d.utilization_rates().ok().map(|u| f64::from(u.gpu));
            s.memory_used_mib = d.memory_info().ok().map(|m| m.used >> 20);
            s.power_w = d.power_usage().ok().map(|mw| f64::from(mw) / 1e3);
            s.temperature_c = d.temperature(TemperatureSensor::Gpu).ok().map(f64::from);
            s.ecc_uncorrected =
                d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile).unwrap_or(0);
            s.pages_pending_retirement = d.are_pages_pending_retired().unwrap_or(false);
            if let Ok(r) = d.current_throttle_reasons() {
                if r.intersects(ThrottleReasons::HW_THERMAL_SLOWDOWN | ThrottleReasons::SW_THERMAL_SLOWDOWN) {
                    s.throttle.push("thermal".into());
                }
                if r.intersects(ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN | ThrottleReasons::HW_SLOWDOWN) {
                    s.throttle.push("power".into());
                }
            }
        }
        Ok(samples)
    }
}

/// The agent's GPUs: the backend (none on a node without GPUs), what it found at discovery, the
/// latest sample of each GPU and the health over time.
#[derive(Default)]
pub struct Monitor {
    backend: Option<Box<dyn GpuBackend>>,
    pub gpus: Vec<GpuInfo>,
    pub driver: Option<String>,
    pub samples: Vec<GpuSample>,
    pub health: Health,
}

impl Monitor {
    pub fn new(backend: Option<Box<dyn GpuBackend>>) -> Monitor {
        let (gpus, driver) = match &backend {
            Some(b) => (b.inventory().gpus.clone(), Some(b.inventory().driver.clone())),
            None => (Vec::new(), None),
        };
        Monitor { backend, gpus, driver, ..Monitor::default() }
    }

    /// Samples every GPU and assesses the samples; returns the fatal findings that are new. A
    /// backend that cannot be read keeps the previous findings (and says so in the error).
    pub fn check(&mut self) -> Result<Vec<GpuFinding>, String> {
        let Some(backend) = self.backend.as_mut() else { return Ok(Vec::new()) };
        let samples = backend.sample()?;
        let findings = self.gpus.iter().zip(&samples).flat_map(|(g, s)| assess(g, s)).collect();
        self.samples = samples;
        Ok(self.health.update(findings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32) -> GpuInfo {
        GpuInfo {
            index,
            uuid: format!("GPU-{index:04}"),
            bus_id: format!("00000000:{:02X}:00.0", 0x18 + index),
            model: "NVIDIA H200".into(),
            memory_mib: 143_771,
        }
    }

    #[test]
    fn xid_79_and_uncorrectable_ecc_are_fatal_and_throttling_warns() {
        let g = gpu(3);
        assert!(assess(&g, &GpuSample::default()).is_empty(), "a healthy GPU finds nothing");
        let off_bus = assess(&g, &GpuSample { xids: vec![79], ..Default::default() });
        assert_eq!(off_bus.len(), 1);
        assert!(off_bus[0].fatal && off_bus[0].reason.contains("fallen off the bus"), "{off_bus:?}");
        let ecc = assess(&g, &GpuSample { ecc_uncorrected: 2, ..Default::default() });
        assert!(ecc[0].fatal && ecc[0].reason == "uncorrectable ECC errors", "{ecc:?}");
        assert_eq!(
            assess(&g, &GpuSample { ecc_uncorrected: 5, ..Default::default() }),
            ecc,
            "more is the same fault"
        );
        let app = assess(&g, &GpuSample { xids: vec![13], ..Default::default() });
        assert!(!app[0].fatal, "an application's own fault is not the GPU's");
        let hot = assess(&g, &GpuSample { throttle: vec!["thermal".into()], ..Default::default() });
        assert!(!hot[0].fatal && hot[0].reason == "throttled (thermal)");
    }

    #[test]
    fn a_fatal_xid_stays_until_the_agent_restarts_and_a_condition_clears_when_a_check_passes() {
        let g = gpu(0);
        let mut h = Health::default();
        let ecc = assess(&g, &GpuSample { ecc_uncorrected: 1, ..Default::default() });
        assert_eq!(h.update(ecc.clone()), ecc, "new and fatal");
        assert!(h.update(ecc).is_empty(), "reported once");
        assert!(h.update(Vec::new()).is_empty(), "nothing new");
        assert!(h.findings().is_empty(), "the check passes: the node may return");
        let xid = assess(&g, &GpuSample { xids: vec![79], ..Default::default() });
        assert_eq!(h.update(xid.clone()), xid);
        h.update(Vec::new());
        assert!(h.findings().iter().any(|f| f.fatal), "an XID is an event: it is kept");
        assert_eq!(h.findings(), xid);
    }

    #[test]
    fn each_launch_gets_free_gpus_in_local_rank_order_and_the_ncc_defaults_yield_to_the_job() {
        let gpus: Vec<GpuInfo> = (0..4).map(gpu).collect();
        let busy: BTreeSet<u32> = [0].into();
        let bound = bind(&gpus, &busy, 2).unwrap();
        assert_eq!(bound.iter().map(|g| g.index).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(bind(&gpus, &busy, 4), None, "three are free");
        let job_env = vec![("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC".to_string(), "600".to_string())];
        let env: std::collections::BTreeMap<String, String> =
            rank_env(&bound, 1, &job_env).into_iter().collect();
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "1,2");
        assert_eq!((env["MYRIAD_GPU_INDEX"].as_str(), env["MYRIAD_GPU_UUID"].as_str()), ("2", "GPU-0002"));
        assert_eq!(env["CUDA_DEVICE_ORDER"], "PCI_BUS_ID");
        assert_eq!(env["TORCH_NCCL_ASYNC_ERROR_HANDLING"], "1");
        assert!(!env.contains_key("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"), "the job's own value stands");
    }

    #[test]
    fn a_fake_file_is_the_inventory_and_each_check_rereads_it() {
        let dir = std::env::temp_dir().join(format!("myriad-agent-gpu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gpus.json");
        let write = |xids: &str| {
            let gpus: Vec<String> = (0..2)
                .map(|i| {
                    format!(
                        r#"{{"uuid":"GPU-{i}","bus_id":"0:{i}","model":"NVIDIA H200","memory_mib":143771,"utilization_pct":90,"xids":{}}}"#,
                        if i == 1 { xids } else { "[]" }
                    )
                })
                .collect();
            std::fs::write(&path, format!(r#"{{"driver":"550.54.15","gpus":[{}]}}"#, gpus.join(",")))
                .unwrap();
        };
        write("[]");
        let mut fake = FakeGpus::open(&path).unwrap();
        assert_eq!(fake.inventory().gpus.len(), 2);
        assert_eq!(fake.inventory().driver, "550.54.15");
        assert_eq!(fake.sample().unwrap()[0].utilization_pct, Some(90.0));
        write("[79]");
        assert_eq!(fake.sample().unwrap()[1].xids, vec![79]);
        std::fs::write(&path, "{").unwrap();
        assert!(fake.sample().unwrap_err().contains("gpus.json"), "a broken file is named");
        std::fs::write(
            &path,
            r#"{"driver":"1","gpus":[{"uuid":"u","bus_id":"b","model":"m","memory_mib":1,"xid":[79]}]}"#,
        )
        .unwrap();
        assert!(
            FakeGpus::open(&path).err().unwrap().contains(r#"unknown field "xid""#),
            "a misspelt fault is refused"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
