//! Whether a machine can hold its share of a run, asked before any worker starts: by `launch`
//! for a run on one machine, by the coordinator for each node agent that registers. Two
//! resources: the GPUs of a CUDA run (local rank i runs on GPU i mod the GPUs there, as the
//! worker places itself) and the host memory every rank's arenas take (a CPU rank's whole
//! arena, a GPU rank's page-locked host arena), against what the kernel says is available.

use tessera_plan::bytes::format_size;
use tessera_plan::config::{Backend, Device};

/// What one rank plans to allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankBytes {
    /// The device arena (GPU memory on CUDA; host memory on CPU).
    pub device: u64,
    /// Host memory: the whole arena on CPU, the page-locked host arena on CUDA.
    pub host_memory: u64,
}

/// What a machine has, as far as it could tell.
pub struct Machine<'a> {
    /// "this machine", or a node's hostname.
    pub host: &'a str,
    /// GPUs the CUDA driver shows.
    pub gpus: usize,
    /// Free bytes per GPU in CUDA ordinal order; empty when unknown.
    pub free: &'a [u64],
    /// Host memory available for new processes (MemAvailable); `None` when unknown.
    pub available: Option<u64>,
}

/// This machine's GPUs as the CUDA driver shows them, and their free memory if NVML can tell
/// it for every one (else empty). Makes no CUDA context, which would take memory from a worker.
pub fn visible() -> (usize, Vec<u64>) {
    let gpus = tessera_worker::tensor::cuda::visible_gpus();
    let free = gpus
        .iter()
        .copied()
        .collect::<Option<_>>()
        .unwrap_or_default();
    (gpus.len(), free)
}

/// MemAvailable from /proc/meminfo: what the kernel can give new processes without swapping.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_available(&meminfo)
}

fn meminfo_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Why `machine` cannot run ranks that plan `planned` (in local-rank order) on `device` over
/// `backend`, with a help line; `None`: it can, as far as the machine could tell.
pub fn shortfall(
    machine: &Machine,
    planned: &[RankBytes],
    device: Device,
    backend: Backend,
) -> Option<String> {
    if device == Device::Cuda {
        let on_gpus: Vec<u64> = planned.iter().map(|r| r.device).collect();
        if let Some(reason) = gpu_shortfall(machine, &on_gpus, backend) {
            return Some(reason);
        }
    }
    memory_shortfall(machine, planned, device)
}

fn plural(n: usize, one: &str, many: &str) -> String {
    match n {
        1 => format!("1 {one}"),
        n => format!("{n} {many}"),
    }
}

/// The ranks' host memory against what the machine has available.
fn memory_shortfall(machine: &Machine, planned: &[RankBytes], device: Device) -> Option<String> {
    let available = machine.available?;
    let needed: u64 = planned.iter().map(|r| r.host_memory).sum();
    if needed <= available {
        return None;
    }
    let largest = planned.iter().map(|r| r.host_memory).max().unwrap_or(0);
    let what = match device {
        Device::Cpu => "arenas",
        Device::Cuda => "page-locked host arenas",
    };
    Some(format!(
        "{} has {} of memory available (MemAvailable), but its {} plan {} of {what} (up to {} \
         each)\n  help: the workers would be killed by the kernel or drive the machine into \
         swap; use fewer ranks per node (cluster.gpus_per_node), a smaller model or ZeRO to \
         shard the states (each rank's bytes: launch --dry-run), or free memory on {}",
        machine.host,
        format_size(available),
        plural(planned.len(), "rank", "ranks"),
        format_size(needed),
        format_size(largest),
        machine.host,
    ))
}

/// The GPUs against ranks that plan `planned` device bytes each.
fn gpu_shortfall(machine: &Machine, planned: &[u64], backend: Backend) -> Option<String> {
    let (host, count, ranks) = (machine.host, machine.gpus, planned.len());
    if ranks == 0 {
        return None;
    }
    if count == 0 {
        return Some(format!(
            "{host} has no GPU that the CUDA driver can see (or no driver), but cluster.device \
             is cuda and {} run there\n  help: run on GPU machines, check CUDA_VISIBLE_DEVICES, \
             or train on CPU workers with cluster.device=cpu and cluster.backend=tcp",
            plural(ranks, "rank", "ranks")
        ));
    }
    if backend == Backend::Nccl && count < ranks {
        return Some(format!(
            "{host} has {} for {}, and NCCL needs a GPU per rank\n  help: lower \
             cluster.gpus_per_node to {count}, or let ranks share GPUs over \
             cluster.backend=tcp (staged through the host: for tests, not speed)",
            plural(count, "GPU", "GPUs"),
            plural(ranks, "rank", "ranks")
        ));
    }
    if machine.free.len() != count {
        return None;
    }
    (0..count).find_map(|gpu| {
        let sharing: Vec<usize> = (gpu..ranks).step_by(count).collect();
        let needed: u64 = sharing.iter().map(|&rank| planned[rank]).sum();
        let free = machine.free[gpu];
        (free < needed).then(|| {
            let who = match sharing.len() {
                1 => "its rank plans".to_string(),
                n => format!("its {n} ranks plan"),
            };
            format!(
                "GPU {gpu} of {host} has {} free, but {who} {} there\n  help: another process \
                 holds that GPU's memory (see nvidia-smi), or the layout needs more than the \
                 GPUs have: see launch --dry-run",
                format_size(free),
                format_size(needed)
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn on(count: usize, free: &[u64]) -> Machine<'_> {
        Machine {
            host: "gpu7",
            gpus: count,
            free,
            available: None,
        }
    }

    fn device(bytes: &[u64]) -> Vec<RankBytes> {
        bytes
            .iter()
            .map(|&device| RankBytes {
                device,
                host_memory: 0,
            })
            .collect()
    }

    fn cuda(machine: &Machine, planned: &[u64], backend: Backend) -> Option<String> {
        shortfall(machine, &device(planned), Device::Cuda, backend)
    }

    #[test]
    fn a_machine_without_gpus_or_with_too_few_for_nccl_is_refused() {
        let planned = [10 * GIB, 12 * GIB];
        let none = cuda(&on(0, &[]), &planned, Backend::Nccl).unwrap();
        assert!(
            none.starts_with(
                "gpu7 has no GPU that the CUDA driver can see (or no driver), but cluster.device \
                 is cuda and 2 ranks run there\n  help: "
            ),
            "{none}"
        );
        let one = cuda(&on(1, &[80 * GIB]), &planned, Backend::Nccl).unwrap();
        assert!(
            one.starts_with(
                "gpu7 has 1 GPU for 2 ranks, and NCCL needs a GPU per rank\n  help: lower \
                 cluster.gpus_per_node to 1,"
            ),
            "{one}"
        );
        // Over TCP the two ranks share the GPU, which holds both plans.
        assert_eq!(cuda(&on(1, &[80 * GIB]), &planned, Backend::Tcp), None);
        assert_eq!(cuda(&on(0, &[]), &[], Backend::Nccl), None, "no ranks");
        // A CPU run needs no GPU.
        assert_eq!(
            shortfall(&on(0, &[]), &device(&planned), Device::Cpu, Backend::Tcp),
            None
        );
    }

    #[test]
    fn a_gpu_with_less_free_memory_than_its_ranks_plan_is_named() {
        let planned = [10 * GIB, 12 * GIB];
        let short = cuda(&on(2, &[79 * GIB, 11 * GIB]), &planned, Backend::Nccl).unwrap();
        assert!(
            short.starts_with(
                "GPU 1 of gpu7 has 11.00 GiB free, but its rank plans 12.00 GiB there"
            ),
            "{short}"
        );
        assert_eq!(
            cuda(&on(2, &[10 * GIB, 12 * GIB]), &planned, Backend::Nccl),
            None,
            "exactly enough"
        );
        assert_eq!(
            cuda(&on(4, &[]), &planned, Backend::Nccl),
            None,
            "NVML could not say"
        );
        // Ranks 0 and 2 share GPU 0: 20 GiB there.
        let shared = cuda(&on(2, &[19 * GIB, 80 * GIB]), &[10 * GIB; 3], Backend::Tcp);
        assert_eq!(
            shared.as_deref().and_then(|s| s.lines().next()),
            Some("GPU 0 of gpu7 has 19.00 GiB free, but its 2 ranks plan 20.00 GiB there")
        );
    }

    #[test]
    fn arenas_beyond_the_available_host_memory_are_refused_naming_the_node() {
        let ranks = vec![
            RankBytes {
                device: 3 * GIB,
                host_memory: 3 * GIB,
            };
            8
        ];
        let machine = Machine {
            host: "node3",
            gpus: 0,
            free: &[],
            available: Some(23 * GIB),
        };
        let short = shortfall(&machine, &ranks, Device::Cpu, Backend::Tcp).unwrap();
        assert!(
            short.starts_with(
                "node3 has 23.00 GiB of memory available (MemAvailable), but its 8 ranks plan \
                 24.00 GiB of arenas (up to 3.00 GiB each)\n  help: "
            ),
            "{short}"
        );
        let roomy = Machine {
            available: Some(24 * GIB),
            ..machine
        };
        assert_eq!(shortfall(&roomy, &ranks, Device::Cpu, Backend::Tcp), None);
        let unknown = Machine {
            available: None,
            ..roomy
        };
        assert_eq!(shortfall(&unknown, &ranks, Device::Cpu, Backend::Tcp), None);
    }

    #[test]
    fn mem_available_is_read_in_kib() {
        let meminfo = "MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(meminfo_available(meminfo), Some(2048 * 1024));
        assert_eq!(meminfo_available("MemTotal: 1 kB\n"), None);
    }
}
