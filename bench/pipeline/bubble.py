#!/usr/bin/env python3
"""Idle fraction per pipeline stage from `launch --trace` files.

For each rank's trace (DIR/rank-NNNNN.json), a step's idle fraction is 1 - (time in forward
and backward spans) / (the step span less its optimizer span: the pipeline's part of the step),
averaged over the steps after the first (warm-up).
Ranks of the same stage are averaged. Usage: bubble.py DIR PIPELINE [TENSOR]
(ranks are numbered tensor-innermost, then pipeline, then data, as in plan::mesh).
Prints one line per stage: "stage S idle F".
"""
import json
import pathlib
import sys


def idle_fractions(path):
    events = json.loads(path.read_text())["traceEvents"]
    steps = sorted((e for e in events if e.get("cat") == "step"), key=lambda e: e["ts"])
    work = [e for e in events if e.get("cat") in ("forward", "backward")]
    optimizer = [e for e in events if e.get("cat") == "optimizer"]
    fractions = []
    for step in steps[1:]:
        start, end = step["ts"], step["ts"] + step["dur"]
        inside = lambda e: start <= e["ts"] and e["ts"] + e["dur"] <= end
        busy = sum(e["dur"] for e in work if inside(e))
        pipeline = step["dur"] - sum(e["dur"] for e in optimizer if inside(e))
        fractions.append(1.0 - busy / pipeline)
    return fractions


def main():
    directory, pipeline = pathlib.Path(sys.argv[1]), int(sys.argv[2])
    tensor = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    per_stage = {}
    for path in sorted(directory.glob("rank-*.json")):
        rank = int(path.stem.split("-")[1])
        stage = (rank // tensor) % pipeline
        per_stage.setdefault(stage, []).extend(idle_fractions(path))
    for stage in sorted(per_stage):
        values = per_stage[stage]
        print(f"stage {stage} idle {sum(values) / len(values):.3f}")


if __name__ == "__main__":
    main()
