#!/usr/bin/env python3
"""Runs one configuration of the PyTorch reference (shared/reference/torch_gpt_ref.py) in a fresh
process, so that its peak memory and device memory are this configuration's alone.

The reference's own command line (`torch_gpt_ref.py 124m-b16`) picks configurations by
substring, which runs the eager, the checkpointed and the compiled 124M together; this imports
the script and calls its `run` for exactly one, with the harness's step counts, and prints what
the script prints: its header line (gpu, torch, nccl, total_gib) and `run`'s result line
({"name", ..., "tok_per_s", "mfu", "peak_reserved_gib", ...} or {"name", "oom": true}).
An error outside `run`'s own out-of-memory handling prints {"name", "error"} and exits 1.

  python torch_one.py --ref PATH --name 124m-b16 --layers 12 --hidden 768 --heads 12 \
      --batch 16 --seq 1024 --steps 20 --warmup 3 [--compile]
"""
import argparse
import importlib.util
import json
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", required=True, help="path of torch_gpt_ref.py")
    ap.add_argument("--name", required=True)
    for flag in ("layers", "hidden", "heads", "batch", "seq", "steps", "warmup"):
        ap.add_argument(f"--{flag}", type=int, required=True)
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()

    spec = importlib.util.spec_from_file_location("torch_gpt_ref", a.ref)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)  # defines the model and run(); its __main__ block does not run
    torch = ref.torch

    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # informational only
        nccl = "?"
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "nccl": nccl,
                      "total_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30,
                                         2)}), flush=True)
    try:
        ref.run(a.name, L=a.layers, d=a.hidden, h=a.heads, B=a.batch, T=a.seq, ckpt=False,
                compile=a.compile, steps=a.steps, warm=a.warmup)
    except torch.cuda.OutOfMemoryError:
        # run() catches OOM in its steps only; building the model or the optimizer can OOM too.
        print(json.dumps({"name": a.name, "oom": True}), flush=True)
    except Exception as e:
        print(json.dumps({"name": a.name, "error": f"{type(e).__name__}: {e}"}), flush=True)
        raise


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except Exception:
        import traceback
        traceback.print_exc()
        sys.exit(1)
