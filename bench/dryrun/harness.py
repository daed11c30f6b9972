#!/usr/bin/env python3
"""Timing harness and report writer for bench/dryrun/run.sh (standard library only).

  harness.py time --label L --runs N --out F.json [--warmup W] [--keep-output F.txt] -- CMD ARGS...
      Runs CMD W times unmeasured, then N times, each a fresh process, timing process start to
      exit with time.perf_counter around subprocess.run (stdout and stderr go to pipes and are
      discarded). A non-zero exit stops the benchmark with an error.

  harness.py report --dir D --md F.md [--meta K=V ...]
      Reads D/*.json written by `time`, prints the table and the ratios, and writes F.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BUDGET_S = 1.0


def cmd_time(a):
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        sys.exit("harness.py time: no command given")
    times = []
    first_out = None
    for i in range(a.warmup + a.runs):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            sys.stderr.write(p.stderr.decode(errors="replace")[-4000:])
            sys.exit(f"harness.py: {a.label}: exit status {p.returncode} from {cmd}")
        if first_out is None:
            first_out = p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")
        if i >= a.warmup:
            times.append(dt)
    res = {
        "label": a.label,
        "cmd": cmd,
        "runs": len(times),
        "warmup": a.warmup,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
    }
    Path(a.out).write_text(json.dumps(res, indent=1))
    if a.keep_output:
        Path(a.keep_output).write_text(first_out)
    print(f"  {a.label}: median {res['median_s']:.4f} s, min {res['min_s']:.4f} s "
          f"({len(times)} runs)", flush=True)


def fmt_s(x):
    return f"{x:.4f}" if x < 10 else f"{x:.2f}"


def cmd_report(a):
    d = Path(a.dir)
    meta = dict(kv.split("=", 1) for kv in a.meta)
    order = ["table", "json", "search", "deepspeed", "torch_import"]
    res = {}
    for k in order:
        f = d / f"{k}.json"
        if f.exists():
            res[k] = json.loads(f.read_text())

    rows = []
    for k in order:
        if k in res:
            r = res[k]
            rows.append((r["label"], fmt_s(r["median_s"]), fmt_s(r["min_s"]), str(r["runs"])))
        elif k == "deepspeed":
            rows.append(("DeepSpeed ZeRO estimator (peer)", "n/a", "n/a", "0"))

    head = ("what", "median s", "min s", "runs")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    text_table = "\n".join(
        "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))
        for r in [head] + rows)
    md_table = "| " + " | ".join(head) + " |\n|---|---:|---:|---:|\n" + "\n".join(
        "| " + " | ".join(r) + " |" for r in rows)

    t = res["table"]["median_s"]
    ratios = [f"175B table: {t:.4f} s = {t / BUDGET_S:.4f}x of the {BUDGET_S:g} s budget "
              f"({'within' if t < BUDGET_S else 'OVER'} budget)"]
    ds_fn = meta.get("ds_function", "the DeepSpeed estimator")
    if "deepspeed" in res:
        ds = res["deepspeed"]["median_s"]
        ratios.append(f"DeepSpeed's estimator takes {ds / t:.0f}x longer than our 175B table "
                      f"({ds:.3f} s / {t:.4f} s, medians; {ds_fn})")
    else:
        why = meta.get("ds_unavailable", "DeepSpeed could not be installed or imported here")
        ratios.append(f"DeepSpeed ratio: unavailable ({why})")
    caveat = ("Caveat: DeepSpeed's estimate covers only ZeRO-3 model states (params, grads, "
              "optimizer states; no activations, no pipeline or tensor layout, no workspace or "
              "communication buffers), while ours is the full per-rank plan for all 1024 ranks "
              "of the configured layout (data 8 x tensor 8 x pipeline 16, ZeRO-1).")
    if "stage_1_and_2" in ds_fn:
        caveat = caveat.replace("ZeRO-3", "ZeRO-2")
    if "deepspeed" in res and "CUDA build" in meta.get("torch_source", ""):
        caveat += (" The peer's torch is PyPI's CUDA build (the CPU-only wheel index could not "
                   "be reached), whose import loads the CUDA libraries and is likely slower "
                   "than the CPU wheel's; it is what most DeepSpeed users on GPU machines have.")

    print()
    print(text_table)
    print()
    for r in ratios:
        print(r)
    print(caveat)

    # Markdown file.
    def out(name):
        f = d / f"{name}.out"
        return f.read_text().rstrip() if f.exists() else None

    lines = [
        f"# Dry-run speed on CPU, {meta.get('date', '')}",
        "",
        "Measured by `bench/dryrun/run.sh`: each row is a fresh process timed from start to exit "
        "(`time.perf_counter` around `subprocess.run`, output to a pipe), after "
        f"{res['table']['warmup']} unmeasured warm-up run(s).",
        "",
        "## Machine",
        "",
        f"- CPU: {meta.get('cpu', '?')}, {meta.get('nproc', '?')} cores (`nproc`), "
        f"{meta.get('arch', '?')}",
        f"- OS: {meta.get('os', '?')}",
        f"- tessera commit: {meta.get('commit', '?')}; {meta.get('rustc', '?')}",
        f"- Python {meta.get('python', '?')}; torch {meta.get('torch', 'n/a')} "
        f"({meta.get('torch_source', '?')}); deepspeed {meta.get('deepspeed', 'n/a')}",
        "",
        "## Results",
        "",
        md_table,
        "",
    ]
    lines += [f"- {r}" for r in ratios]
    lines += ["", caveat, "", "## Commands", ""]
    for k in order:
        if k in res:
            c = res[k]["cmd"]
            if k in ("deepspeed", "torch_import"):
                c = ["bench/.venv/bin/python"] + c[1:]
            shown = " ".join(x if " " not in x and x else repr(x) for x in c)
            lines.append(f"- {res[k]['label'].strip()}: `{shown}`")
    if "deepspeed" not in res:
        lines.append(f"- DeepSpeed: not measured ({meta.get('ds_unavailable', 'unavailable')})")
    ours = out("table")
    if ours:
        fits = [l for l in ours.splitlines() if l.startswith("fits") or l.startswith("does not")]
        lines += ["", "## What each one answers", "",
                  "tessera (last line of the table):", "", "```", *fits, "```"]
    dso = out("deepspeed")
    if dso:
        lines += ["", f"DeepSpeed (`{ds_fn}`, as printed):", "", "```", dso, "```"]
    lines.append("")
    Path(a.md).write_text("\n".join(lines))
    print(f"\nwrote {a.md}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="sub", required=True)
    t = sub.add_parser("time")
    t.add_argument("--label", required=True)
    t.add_argument("--runs", type=int, required=True)
    t.add_argument("--warmup", type=int, default=1)
    t.add_argument("--out", required=True)
    t.add_argument("--keep-output")
    t.add_argument("cmd", nargs=argparse.REMAINDER)
    r = sub.add_parser("report")
    r.add_argument("--dir", required=True)
    r.add_argument("--md", required=True)
    r.add_argument("--meta", action="append", default=[])
    a = ap.parse_args()
    {"time": cmd_time, "report": cmd_report}[a.sub](a)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
