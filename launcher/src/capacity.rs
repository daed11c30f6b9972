//! Whether a machine's GPUs can run its share of a CUDA run, asked before any worker starts:
//! by `launch` for a run on one machine, by the coordinator for each node agent that
//! registers. Local rank i runs on GPU i mod (the GPUs there), as the worker places itself.

use tessera_plan::bytes::format_size;
use tessera_plan::config::Backend;

/// What a machine has: its GPUs and, if NVML could tell it for every one, their free memory.
pub struct Gpus<'a> {
    /// "this machine", or a node's hostname.
    pub host: &'a str,
    pub count: usize,
    /// Free bytes per GPU in CUDA ordinal order; empty when unknown.
    pub free: &'a [u64],
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

/// Why `gpus` cannot run ranks that plan `planned` device bytes each (in local-rank order)
/// over `backend`, with a help line; `None`: they can, as far as the machine could tell.
pub fn shortfall(gpus: &Gpus, planned: &[u64], backend: Backend) -> Option<String> {
    let (host, count, ranks) = (gpus.host, gpus.count, planned.len());
    if ranks == 0 {
        return None;
    }
    let plural = |n: usize, one: &str, many: &str| match n {
        1 => format!("1 {one}"),
        n => format!("{n} {many}"),
    };
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
    if gpus.free.len() != count {
        return None;
    }
    (0..count).find_map(|gpu| {
        let sharing: Vec<usize> = (gpu..ranks).step_by(count).collect();
        let needed: u64 = sharing.iter().map(|&rank| planned[rank]).sum();
        let free = gpus.free[gpu];
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

    fn on(count: usize, free: &[u64]) -> Gpus<'_> {
        Gpus {
            host: "gpu7",
            count,
            free,
        }
    }

    #[test]
    fn a_machine_without_gpus_or_with_too_few_for_nccl_is_refused() {
        let planned = [10 * GIB, 12 * GIB];
        let none = shortfall(&on(0, &[]), &planned, Backend::Nccl).unwrap();
        assert!(
            none.starts_with(
                "gpu7 has no GPU that the CUDA driver can see (or no driver), but cluster.device \
                 is cuda and 2 ranks run there\n  help: "
            ),
            "{none}"
        );
        let one = shortfall(&on(1, &[80 * GIB]), &planned, Backend::Nccl).unwrap();
        assert!(
            one.starts_with(
                "gpu7 has 1 GPU for 2 ranks, and NCCL needs a GPU per rank\n  help: lower \
                 cluster.gpus_per_node to 1,"
            ),
            "{one}"
        );
        // Over TCP the two ranks share the GPU, which holds both plans.
        assert_eq!(shortfall(&on(1, &[80 * GIB]), &planned, Backend::Tcp), None);
        assert_eq!(shortfall(&on(0, &[]), &[], Backend::Nccl), None, "no ranks");
    }

    #[test]
    fn a_gpu_with_less_free_memory_than_its_ranks_plan_is_named() {
        let planned = [10 * GIB, 12 * GIB];
        let short = shortfall(&on(2, &[79 * GIB, 11 * GIB]), &planned, Backend::Nccl).unwrap();
        assert!(
            short.starts_with(
                "GPU 1 of gpu7 has 11.00 GiB free, but its rank plans 12.00 GiB there"
            ),
            "{short}"
        );
        assert_eq!(
            shortfall(&on(2, &[10 * GIB, 12 * GIB]), &planned, Backend::Nccl),
            None,
            "exactly enough"
        );
        assert_eq!(
            shortfall(&on(4, &[]), &planned, Backend::Nccl),
            None,
            "NVML could not say"
        );
        // Ranks 0 and 2 share GPU 0: 20 GiB there.
        let shared = shortfall(&on(2, &[19 * GIB, 80 * GIB]), &[10 * GIB; 3], Backend::Tcp);
        assert_eq!(
            shared.as_deref().and_then(|s| s.lines().next()),
            Some("GPU 0 of gpu7 has 19.00 GiB free, but its 2 ranks plan 20.00 GiB there")
        );
    }
}
