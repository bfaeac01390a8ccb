//! What a worker has (its devices with their measured speed and memory), and the cluster spec the
//! planner reads: the workers, their devices and the links between them. A `cluster.yaml` file
//! describes one ([`ClusterSpec::from_yaml`]); a live cluster reports the same structure
//! ([`ClusterSpec::from_live`]).

use crate::ids::WorkerId;
use serde::{Deserialize, Serialize};

/// The kind of compute device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
    Metal,
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Metal => "metal",
        }
    }

    pub fn parse(s: &str) -> Option<DeviceKind> {
        match s {
            "cpu" => Some(DeviceKind::Cpu),
            "cuda" => Some(DeviceKind::Cuda),
            "metal" => Some(DeviceKind::Metal),
            _ => None,
        }
    }

    /// Matmul TFLOP/s assumed for a device that was not measured (bf16 on GPUs, f32 on CPUs).
    pub fn default_tflops(self) -> f64 {
        match self {
            DeviceKind::Cpu => 0.5,
            DeviceKind::Cuda => 50.0,
            DeviceKind::Metal => 10.0,
        }
    }

    /// Memory bandwidth (GB/s) assumed when not measured.
    pub fn default_memory_bandwidth_gb_s(self) -> f64 {
        match self {
            DeviceKind::Cpu => 40.0,
            DeviceKind::Cuda => 500.0,
            DeviceKind::Metal => 200.0,
        }
    }
}

/// One device of a worker, as detected and measured by the worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub kind: DeviceKind,
    pub name: String,
    pub ordinal: u32,
    pub memory_bytes: u64,
    pub free_bytes: u64,
    /// Measured matmul throughput (f32 on CPUs, bf16 on GPUs); 0 when not measured.
    pub measured_tflops: f64,
    pub cores: u32,
}

/// The link assumed between two workers when nothing was measured: gigabit Ethernet.
pub const LAN_DEFAULT: LinkSpec = LinkSpec { bandwidth_gbit_s: 1.0, latency_us: 300.0 };
/// Host-to-device (and device-to-device inside one machine) bandwidth assumed when not given:
/// PCIe 4.0 x16 as applications see it.
pub const DEFAULT_HOST_LINK_GB_S: f64 = 12.0;
/// Most devices one cluster spec may expand to.
pub const MAX_CLUSTER_DEVICES: usize = 4096;
const GIB: f64 = (1u64 << 30) as f64;

/// A network link: bandwidth in gigabits per second, one-way latency in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    pub bandwidth_gbit_s: f64,
    pub latency_us: f64,
}

impl LinkSpec {
    pub fn bytes_per_s(&self) -> f64 {
        self.bandwidth_gbit_s * 1e9 / 8.0
    }
    pub fn latency_s(&self) -> f64 {
        self.latency_us * 1e-6
    }
}

fn lan_default() -> LinkSpec {
    LAN_DEFAULT
}
fn one() -> usize {
    1
}
fn default_host_link() -> f64 {
    DEFAULT_HOST_LINK_GB_S
}

/// A cluster: its workers and the links between them (`cluster.yaml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    pub name: String,
    /// The link between any two workers that `links` does not name.
    #[serde(default = "lan_default")]
    pub default_link: LinkSpec,
    pub workers: Vec<WorkerSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkOverride>,
}

/// One machine (or `count` identical machines, named `name-1` .. `name-N`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSpec {
    pub name: String,
    /// The coordinator's id for a live worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<WorkerId>,
    #[serde(default = "one")]
    pub count: usize,
    pub host_ram_gib: f64,
    /// Host-to-device bandwidth (GB/s), also used between devices of this machine.
    #[serde(default = "default_host_link")]
    pub host_link_gb_s: f64,
    pub devices: Vec<DeviceSpec>,
}

/// A device (or `count` identical devices) of a worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    pub kind: DeviceKind,
    pub name: String,
    /// Device memory; for a CPU, the host RAM when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_gib: Option<f64>,
    /// Measured matmul TFLOP/s: bf16 on GPUs, f32 on CPUs.
    pub bf16_tflops: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bandwidth_gb_s: Option<f64>,
    #[serde(default = "one")]
    pub count: usize,
}

/// A measured link between two workers (by name; a `count` group's base name covers all of it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkOverride {
    pub between: [String; 2],
    pub bandwidth_gbit_s: f64,
    pub latency_us: f64,
}

/// One problem with a cluster spec: which field, what value, what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} = {value}: {problem}; {fix}")]
pub struct ClusterError {
    pub field: String,
    pub value: String,
    pub problem: String,
    pub fix: String,
}

fn err(field: impl Into<String>, value: impl std::fmt::Display, problem: &str, fix: &str) -> ClusterError {
    ClusterError { field: field.into(), value: value.to_string(), problem: problem.into(), fix: fix.into() }
}

/// A live worker as the coordinator knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveWorker {
    pub id: WorkerId,
    pub devices: Vec<DeviceInfo>,
    pub host_ram_bytes: u64,
}

/// One device the planner can place work on, after `count` expansion.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanDevice {
    /// Index of the (expanded) worker, in file order.
    pub worker: usize,
    pub worker_name: String,
    /// The worker entry's own name (the base of `name-1` .. `name-N`).
    pub group: String,
    pub kind: DeviceKind,
    pub name: String,
    pub ordinal: u32,
    pub memory_bytes: u64,
    pub flops_per_s: f64,
    pub memory_bytes_per_s: f64,
    pub host_ram_bytes: u64,
    pub host_link_bytes_per_s: f64,
}

impl ClusterSpec {
    /// Parses YAML, rejecting unknown fields, then validates.
    pub fn from_yaml(text: &str) -> Result<ClusterSpec, String> {
        let c: ClusterSpec = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    /// The cluster the coordinator sees: one worker per live worker, GPUs as measured (CPUs are
    /// kept only on workers without a GPU), every link the LAN default unless given.
    pub fn from_live(name: &str, workers: &[LiveWorker], default_link: LinkSpec) -> ClusterSpec {
        let workers = workers
            .iter()
            .map(|w| {
                let gpus: Vec<&DeviceInfo> = w.devices.iter().filter(|d| d.kind != DeviceKind::Cpu).collect();
                let chosen: Vec<&DeviceInfo> = if gpus.is_empty() { w.devices.iter().collect() } else { gpus };
                WorkerSpec {
                    name: w.id.to_string(),
                    id: Some(w.id),
                    count: 1,
                    host_ram_gib: w.host_ram_bytes as f64 / GIB,
                    host_link_gb_s: DEFAULT_HOST_LINK_GB_S,
                    devices: chosen
                        .into_iter()
                        .map(|d| DeviceSpec {
                            kind: d.kind,
                            name: d.name.clone(),
                            memory_gib: Some(d.memory_bytes as f64 / GIB),
                            bf16_tflops: if d.measured_tflops > 0.0 {
                                d.measured_tflops
                            } else {
                                d.kind.default_tflops()
                            },
                            memory_bandwidth_gb_s: None,
                            count: 1,
                        })
                        .collect(),
                }
            })
            .collect();
        ClusterSpec { name: name.to_string(), default_link, workers, links: Vec::new() }
    }

    /// Checks every field; each error names the field, the value and the fix.
    pub fn validate(&self) -> Result<(), ClusterError> {
        if self.name.trim().is_empty() {
            return Err(err("name", "\"\"", "must not be empty", "name the cluster, e.g. name: home-lab"));
        }
        check_link("default_link", &self.default_link)?;
        if self.workers.is_empty() {
            return Err(err("workers", "[]", "lists no worker", "add at least one worker with its devices"));
        }
        let mut names: Vec<&str> = Vec::new();
        let mut total = 0usize;
        for (i, w) in self.workers.iter().enumerate() {
            let f = |x: &str| format!("workers[{i}].{x}");
            if w.name.is_empty() || !w.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(err(
                    f("name"),
                    format!("{:?}", w.name),
                    "must be non-empty ASCII letters, digits, '-', '_' or '.'",
                    "e.g. name: pc1",
                ));
            }
            if names.contains(&w.name.as_str()) {
                return Err(err(f("name"), &w.name, "is used by another worker", "give each worker its own name"));
            }
            names.push(&w.name);
            if w.count == 0 || w.count > MAX_CLUSTER_DEVICES {
                return Err(err(f("count"), w.count, &format!("must be in [1, {MAX_CLUSTER_DEVICES}]"), "e.g. 4"));
            }
            positive(&f("host_ram_gib"), w.host_ram_gib, "the machine's RAM, e.g. 64")?;
            positive(&f("host_link_gb_s"), w.host_link_gb_s, "e.g. 12 for PCIe 4.0 x16")?;
            if w.devices.is_empty() {
                return Err(err(
                    f("devices"),
                    "[]",
                    "lists no device",
                    "add its GPUs, or { kind: cpu, name: cpu, bf16_tflops: 1.0 }",
                ));
            }
            for (j, d) in w.devices.iter().enumerate() {
                let g = |x: &str| format!("workers[{i}].devices[{j}].{x}");
                if d.name.trim().is_empty() {
                    return Err(err(g("name"), "\"\"", "must not be empty", "e.g. name: RTX 4090"));
                }
                match d.memory_gib {
                    Some(m) => positive(&g("memory_gib"), m, "e.g. 24 for an RTX 4090")?,
                    None if d.kind != DeviceKind::Cpu => {
                        return Err(err(
                            g("memory_gib"),
                            "(missing)",
                            &format!("is required for a {} device", d.kind.as_str()),
                            "give the device memory in GiB, e.g. memory_gib: 24",
                        ));
                    }
                    None => {}
                }
                positive(&g("bf16_tflops"), d.bf16_tflops, "the measured matmul TFLOP/s, e.g. 165 for an RTX 4090")?;
                if let Some(bw) = d.memory_bandwidth_gb_s {
                    positive(&g("memory_bandwidth_gb_s"), bw, "e.g. 1008 for an RTX 4090, or leave it out")?;
                }
                if d.count == 0 || d.count > 64 {
                    return Err(err(g("count"), d.count, "must be in [1, 64]", "e.g. count: 2"));
                }
                total += w.count * d.count;
            }
        }
        if total > MAX_CLUSTER_DEVICES {
            return Err(err(
                "workers",
                format!("{total} devices"),
                &format!("is more than {MAX_CLUSTER_DEVICES}"),
                "plan a smaller cluster",
            ));
        }
        for (i, l) in self.links.iter().enumerate() {
            let f = |x: &str| format!("links[{i}].{x}");
            for n in &l.between {
                if !names.contains(&n.as_str()) && !self.expanded_names().iter().any(|e| e == n) {
                    return Err(err(
                        f("between"),
                        format!("{n:?}"),
                        "names no worker",
                        &format!("use one of {}", names.join(", ")),
                    ));
                }
            }
            let group = self.workers.iter().any(|w| w.name == l.between[0] && w.count > 1);
            if l.between[0] == l.between[1] && !group {
                return Err(err(
                    f("between"),
                    format!("{:?}", l.between),
                    "links a worker to itself",
                    "name two workers, or a group (count > 1) twice for the links inside it",
                ));
            }
            check_link(
                &format!("links[{i}]"),
                &LinkSpec { bandwidth_gbit_s: l.bandwidth_gbit_s, latency_us: l.latency_us },
            )?;
        }
        Ok(())
    }

    /// The name of every worker after `count` expansion, in file order.
    pub fn expanded_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for w in &self.workers {
            if w.count == 1 {
                out.push(w.name.clone());
            } else {
                out.extend((1..=w.count).map(|k| format!("{}-{k}", w.name)));
            }
        }
        out
    }

    /// Every device the planner can use, in file order. On a worker that has GPUs, its CPU is the
    /// host (for offload), not a device of its own.
    pub fn plan_devices(&self) -> Vec<PlanDevice> {
        let mut out = Vec::new();
        let mut worker = 0;
        for w in &self.workers {
            let has_gpu = w.devices.iter().any(|d| d.kind != DeviceKind::Cpu);
            let host_ram_bytes = (w.host_ram_gib * GIB) as u64;
            for k in 1..=w.count {
                let worker_name = if w.count == 1 { w.name.clone() } else { format!("{}-{k}", w.name) };
                let mut ordinal = 0;
                for d in w.devices.iter().filter(|d| !has_gpu || d.kind != DeviceKind::Cpu) {
                    for _ in 0..d.count {
                        out.push(PlanDevice {
                            worker,
                            worker_name: worker_name.clone(),
                            group: w.name.clone(),
                            kind: d.kind,
                            name: d.name.clone(),
                            ordinal,
                            memory_bytes: d.memory_gib.map_or(host_ram_bytes, |m| (m * GIB) as u64),
                            flops_per_s: d.bf16_tflops * 1e12,
                            memory_bytes_per_s: d
                                .memory_bandwidth_gb_s
                                .unwrap_or(d.kind.default_memory_bandwidth_gb_s())
                                * 1e9,
                            host_ram_bytes,
                            host_link_bytes_per_s: w.host_link_gb_s * 1e9,
                        });
                        ordinal += 1;
                    }
                }
                worker += 1;
            }
        }
        out
    }

    /// The link between two expanded workers: bytes per second and latency in seconds.
    pub fn link(&self, a: &PlanDevice, b: &PlanDevice) -> (f64, f64) {
        if a.worker == b.worker {
            return (a.host_link_bytes_per_s, 5e-6);
        }
        let matches = |n: &String, d: &PlanDevice| *n == d.worker_name || *n == d.group;
        for l in &self.links {
            let [x, y] = &l.between;
            if (matches(x, a) && matches(y, b)) || (matches(x, b) && matches(y, a)) {
                return (l.bandwidth_gbit_s * 1e9 / 8.0, l.latency_us * 1e-6);
            }
        }
        (self.default_link.bytes_per_s(), self.default_link.latency_s())
    }
}

fn positive(field: &str, v: f64, fix: &str) -> Result<(), ClusterError> {
    if v.is_finite() && v > 0.0 { Ok(()) } else { Err(err(field, v, "must be > 0", fix)) }
}

fn check_link(field: &str, l: &LinkSpec) -> Result<(), ClusterError> {
    positive(&format!("{field}.bandwidth_gbit_s"), l.bandwidth_gbit_s, "e.g. 1 for gigabit Ethernet")?;
    if !(l.latency_us.is_finite() && l.latency_us >= 0.0) {
        return Err(err(format!("{field}.latency_us"), l.latency_us, "must be >= 0", "e.g. 300 for a LAN"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"
name: t
workers:
  - { name: pc, count: 2, host_ram_gib: 64, devices: [{ kind: cuda, name: RTX 4090, memory_gib: 24, bf16_tflops: 165 }] }
  - { name: box, host_ram_gib: 32, devices: [{ kind: cpu, name: cpu, bf16_tflops: 1 }] }
links:
  - { between: [pc-1, pc-2], bandwidth_gbit_s: 10, latency_us: 50 }
"#;

    #[test]
    fn expands_counts_and_links() {
        let c = ClusterSpec::from_yaml(TWO).unwrap();
        let d = c.plan_devices();
        assert_eq!(d.len(), 3);
        assert_eq!(d[1].worker_name, "pc-2");
        assert_eq!(d[2].memory_bytes, 32 << 30);
        assert_eq!(c.link(&d[0], &d[1]), (10e9 / 8.0, 50.0 * 1e-6));
        assert_eq!(c.link(&d[0], &d[2]), (LAN_DEFAULT.bytes_per_s(), LAN_DEFAULT.latency_s()));
    }

    #[test]
    fn errors_name_field_value_and_fix() {
        let cases = [
            ("memory_gib: 24", "memory_gib: 0", "workers[0].devices[0].memory_gib = 0"),
            ("bf16_tflops: 165", "bf16_tflops: -3", "workers[0].devices[0].bf16_tflops = -3"),
            ("host_ram_gib: 32", "host_ram_gib: 0", "workers[1].host_ram_gib = 0"),
            ("[pc-1, pc-2]", "[pc-1, nas]", "links[0].between = \"nas\""),
            ("name: box", "name: pc", "workers[1].name = pc"),
            (", memory_gib: 24", "", "workers[0].devices[0].memory_gib = (missing)"),
        ];
        for (from, to, want) in cases {
            let e = ClusterSpec::from_yaml(&TWO.replace(from, to)).unwrap_err();
            assert!(e.starts_with(want), "{to}: {e}");
            assert!(e.contains(';'), "no fix in: {e}");
        }
        let e = ClusterSpec::from_yaml(&TWO.replace("host_ram_gib: 32", "host_ram: 32")).unwrap_err();
        assert!(e.contains("host_ram"), "{e}");
    }

    #[test]
    fn live_workers_become_a_cluster() {
        let gpu = DeviceInfo {
            kind: DeviceKind::Cuda,
            name: "RTX 3090".into(),
            ordinal: 0,
            memory_bytes: 24 << 30,
            free_bytes: 23 << 30,
            measured_tflops: 0.0,
            cores: 0,
        };
        let cpu = DeviceInfo { kind: DeviceKind::Cpu, name: "cpu".into(), measured_tflops: 1.2, ..gpu.clone() };
        let live = [
            LiveWorker { id: WorkerId(3), devices: vec![cpu.clone(), gpu], host_ram_bytes: 64 << 30 },
            LiveWorker { id: WorkerId(4), devices: vec![cpu], host_ram_bytes: 16 << 30 },
        ];
        let c = ClusterSpec::from_live("live", &live, LAN_DEFAULT);
        c.validate().unwrap();
        let d = c.plan_devices();
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].kind, d[0].worker_name.as_str()), (DeviceKind::Cuda, "w3"));
        assert_eq!(d[0].flops_per_s, DeviceKind::Cuda.default_tflops() * 1e12);
        assert_eq!((d[1].kind, d[1].flops_per_s), (DeviceKind::Cpu, 1.2e12));
    }
}
