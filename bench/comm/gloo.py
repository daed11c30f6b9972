"""All-reduce bus bandwidth of torch.distributed's gloo backend across local processes, measured
exactly like tessera-bench-comm (one warm-up, iterations filling MIN_SECONDS, timed between
barriers). Prints one JSON line per size from rank 0.

    python gloo.py WORLD BYTES...
"""
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MIN_SECONDS = 0.5
MIN_ITERS = 3


def rank_main(rank, world, port, sizes):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for size in sizes:
        buf = torch.ones(size // 4, dtype=torch.float32)
        dist.all_reduce(buf)
        start = time.perf_counter()
        dist.all_reduce(buf)
        once = time.perf_counter() - start
        iters = torch.tensor([max(MIN_ITERS, int(-(-MIN_SECONDS // once)))], dtype=torch.int64)
        dist.broadcast(iters, 0)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(int(iters.item())):
            dist.all_reduce(buf)
        dist.barrier()
        seconds = (time.perf_counter() - start) / int(iters.item())
        if rank == 0:
            busbw = size / seconds * 2 * (world - 1) / world
            print(json.dumps({"impl": "gloo", "world": world, "bytes": size, "seconds": seconds,
                              "busbw_gbps": busbw / 1e9}), flush=True)
    dist.destroy_process_group()


def main():
    world = int(sys.argv[1])
    sizes = [int(s) for s in sys.argv[2:]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(world, port, sizes), nprocs=world, join=True)


if __name__ == "__main__":
    main()
