#!/usr/bin/env python3
"""Step stall of checkpoint saves (standard library only; run from the repo root).

  stall.py --worker BIN --dir D --steps N --every K [--set key=value ...]

Trains one rank with BIN (a tessera-worker) twice over configs/tiny-cpu.yaml with the --set
values: once with checkpoint.every=0 (the baseline), once with checkpoint.every=K into D. Each
step line the worker prints is timestamped as it arrives; a step's interval is the time since
the previous step's line. A save of step N runs between step N's optimizer step and its line; a
background write then shares the machine with the steps after it, and its commit follows a later
step. Two numbers per save of step N: `blocked`, how long the step loop waited for the save
(interval(N) less the baseline's median interval), and `window`, everything its window of steps
N .. N+K-1 took beyond the baseline (their intervals' sum less K baseline intervals: the
blocked time, a background write's competition for the cores and the disk, the commit). The
last save (the end of the run waits for it) is left out. Prints one JSON object: the baseline
median, the per-save numbers, and the checkpoint's size on disk.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time


def intervals(command):
    """(step, seconds since the previous step line) of each step line of `command`."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, last = [], None
    for line in process.stdout:
        now = time.monotonic()
        if line.startswith("step "):
            step = int(line.split()[1].split("/")[0])
            if last is not None:
                out.append((step, now - last))
            last = now
    stderr = process.stderr.read()
    if process.wait() != 0:
        sys.exit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()

    def command(every):
        sets = args.set + [
            f"training.steps={args.steps}",
            f"checkpoint.every={every}",
            f"checkpoint.dir={args.dir}",
            "checkpoint.keep=2",
        ]
        return [args.worker, "--config", "configs/tiny-cpu.yaml", "--fresh",
                "--threads", str(args.threads)] + [
            word for s in sets for word in ("--set", s)
        ]

    shutil.rmtree(args.dir, ignore_errors=True)
    base = intervals(command(0))
    # The first steps warm caches up: leave them out of the baseline.
    baseline = statistics.median(seconds for step, seconds in base if step > 3)
    saving = dict(intervals(command(args.every)))
    saves = [n for n in range(args.every, args.steps, args.every) if n + args.every <= args.steps]
    blocked = [saving[n] - baseline for n in saves]
    windows = [
        sum(saving[k] for k in range(n, n + args.every)) - args.every * baseline for n in saves
    ]
    newest = sorted(d for d in os.listdir(args.dir) if d.startswith("step-") and "." not in d)[-1]
    size = sum(
        os.path.getsize(os.path.join(args.dir, newest, f))
        for f in os.listdir(os.path.join(args.dir, newest))
    )
    shutil.rmtree(args.dir, ignore_errors=True)
    print(json.dumps({
        "baseline_step_s": baseline,
        "saves": saves,
        "blocked_s": blocked,
        "window_s": windows,
        "checkpoint_bytes": size,
    }))


if __name__ == "__main__":
    main()
