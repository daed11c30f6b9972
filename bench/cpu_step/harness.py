#!/usr/bin/env python3
"""Sizes, runner and report for bench/cpu_step/run.sh (standard library only; run from the repo root).

  harness.py sizes
      Prints the names of the benchmark sizes, one a line.

  harness.py needs S...
      Prints what sizes S... need, one a line: the cargo packages to build in release
      (tessera-worker, tessera-launcher) and `transformers` when the PyTorch side needs it.

  harness.py config --size S --steps N --dir D
      Prints the job config the tessera side of a `launch` size (the llama ones) trains.

  harness.py run --size S --threads K --steps N --warmup-steps W --dir D --python PY
      Trains size S for W+N optimizer steps, first with tessera, then with
      bench/cpu_step/torch_step.py under PY, both on K threads, and writes D/S.ours.json and
      D/S.torch.json: every step's tokens/s and loss and the median over the last N steps.
      A failing side stops the benchmark with its output's tail. The GPT-2 sizes run
      target/release/tessera-worker; the llama sizes run target/release/launch on a job config
      written to D/S.yaml (one rank), with the same settings.

  harness.py report --dir D [--md F.md] [--meta K=V ...]
      Prints the table (size, ours tok/s, torch tok/s, ratio, losses) and, with --md, writes it
      as the results markdown.

Every model, batch and optimizer setting of a size is in SIZES and goes to both sides
explicitly (the worker gets them as --set over configs/tiny-cpu.yaml, launch a whole config),
so both train the same model with the same schedule.
"""
import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "configs/tiny-cpu.yaml"
WORKER = "target/release/tessera-worker"
LAUNCH = "target/release/launch"
TORCH_STEP = "bench/cpu_step/torch_step.py"

# The optimizer and data settings of configs/tiny-cpu.yaml, passed to both sides.
OPTIM = {"lr": 1.0e-3, "min_lr": 1.0e-4, "warmup": 20, "weight_decay": 0.1, "grad_clip": 1.0}
SEED = 1234

# name -> model and batch. `tiny` is configs/tiny-cpu.yaml's model and batch as they are; the
# others are closer to real work at 1-5 s per step on 2 cores. Every size accumulates 8
# micro-batches per step. The llama sizes also have kv_heads, theta and norm_eps; their PyTorch
# side is transformers' LlamaForCausalLM.
SIZES = {
    "tiny": dict(arch="gpt2", layers=4, hidden=128, heads=4, ffn=512, seq=128, vocab=256,
                 global_batch=16, micro_batch=2),
    "small": dict(arch="gpt2", layers=6, hidden=384, heads=6, ffn=1536, seq=256, vocab=256,
                  global_batch=16, micro_batch=2),
    "small-50k": dict(arch="gpt2", layers=6, hidden=384, heads=6, ffn=1536, seq=256, vocab=50257,
                      global_batch=8, micro_batch=1),
    "llama-small": dict(arch="llama", layers=4, hidden=256, heads=8, kv_heads=4, ffn=688, seq=256,
                        vocab=4096, theta=10000.0, norm_eps=1.0e-5,
                        global_batch=16, micro_batch=2),
}


def describe(s):
    heads = f"H{s['heads']}" + (f" KV{s['kv_heads']}" if "kv_heads" in s else "")
    return (f"{s['arch']} L{s['layers']} C{s['hidden']} {heads} F{s['ffn']} T{s['seq']} "
            f"V{s['vocab']}, batch {s['global_batch']} = {s['global_batch'] // s['micro_batch']} "
            f"x {s['micro_batch']}")


def via_launch(s):
    """Whether tessera's side of size s is `launch --config` (the worker's --set: GPT-2 only)."""
    return s["arch"] != "gpt2"


def needs(names):
    """The release packages and Python extras that the sizes `names` need."""
    sizes = [SIZES[n] for n in names]
    out = ["tessera-worker"] if any(not via_launch(s) for s in sizes) else []
    if any(via_launch(s) for s in sizes):
        out.append("tessera-launcher")
    if any(s["arch"] == "llama" for s in sizes):
        out.append("transformers")
    return out


def yaml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        r = repr(v)
        if "e" not in r:
            return r
        # YAML 1.1 readers want a dot in the mantissa: 1e-05 -> 1.0e-5.
        mantissa, exponent = f"{v:e}".split("e")
        mantissa = mantissa.rstrip("0")
        return f"{mantissa}{'0' if mantissa.endswith('.') else ''}e{int(exponent)}"
    v = str(v)
    plain = re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", v) and v.lower() not in YAML_WORDS
    return v if plain else json.dumps(v)  # a JSON string is a YAML string too


# Plain words YAML would read as something else than a string.
YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n", "null", "nan", "inf"}


def yaml_text(tree, indent=0):
    """YAML of nested dicts of scalars (the standard library has no YAML writer)."""
    lines = []
    for k, v in tree.items():
        if isinstance(v, dict):
            lines.append(" " * indent + f"{k}:")
            lines.append(yaml_text(v, indent + 2))
        else:
            lines.append(" " * indent + f"{k}: {yaml_value(v)}")
    return "\n".join(lines)


def job_config(s, steps, ckpt_dir):
    """The whole job config of a `launch` size: one CPU rank, the size's model and batch, the
    optimizer and data of configs/tiny-cpu.yaml, no checkpoints and no restarts."""
    model = {"arch": s["arch"], "layers": s["layers"], "hidden": s["hidden"], "heads": s["heads"]}
    if s["arch"] == "llama":
        model["kv_heads"] = s["kv_heads"]
    model.update({"ffn_hidden": s["ffn"], "vocab": s["vocab"], "seq_len": s["seq"]})
    if s["arch"] == "llama":
        model.update({"rope_theta": s["theta"], "norm_eps": s["norm_eps"],
                      "tie_embeddings": False})
    return {
        "model": model,
        "parallel": {"data": 1, "tensor": 1, "pipeline": 1, "sequence_parallel": False,
                     "zero": 1, "recompute": "none", "schedule": "1f1b"},
        "training": {"global_batch": s["global_batch"], "micro_batch": s["micro_batch"],
                     "precision": "fp32", "steps": steps, "seed": SEED,
                     "optimizer": dict(OPTIM)},
        "data": {"kind": "synthetic"},
        "cluster": {"nodes": 1, "gpus_per_node": 1, "gpu_memory": "1GiB", "device": "cpu",
                    "backend": "tcp", "headroom": 0.2},
        "checkpoint": {"dir": ckpt_dir, "every": 0, "keep": 1},
        "restart": {"max": 0},
    }


def write_job_config(s, name, steps, d):
    path = Path(d) / f"{name}.yaml"
    path.write_text(f"# bench/cpu_step/harness.py: tessera's side of size {name}\n"
                    + yaml_text(job_config(s, steps, str(Path(d) / f"{name}.ckpt"))) + "\n")
    return path


def launch_cmd(config, threads, metrics):
    return [LAUNCH, "--config", str(config), "--threads", str(threads), "--metrics", metrics,
            "--fresh"]


def worker_cmd(s, steps, threads, metrics, ckpt_dir):
    sets = {
        "parallel.data": 1, "parallel.tensor": 1, "parallel.pipeline": 1,
        "parallel.sequence_parallel": "false", "parallel.recompute": "none",
        "cluster.gpus_per_node": 1,
        "model.layers": s["layers"], "model.hidden": s["hidden"], "model.heads": s["heads"],
        "model.ffn_hidden": s["ffn"], "model.seq_len": s["seq"], "model.vocab": s["vocab"],
        "training.global_batch": s["global_batch"], "training.micro_batch": s["micro_batch"],
        "training.precision": "fp32", "training.steps": steps, "training.seed": SEED,
        "training.optimizer.lr": OPTIM["lr"], "training.optimizer.min_lr": OPTIM["min_lr"],
        "training.optimizer.warmup": OPTIM["warmup"],
        "training.optimizer.weight_decay": OPTIM["weight_decay"],
        "training.optimizer.grad_clip": OPTIM["grad_clip"],
        "data.kind": "synthetic",
        "checkpoint.every": 0, "checkpoint.dir": ckpt_dir,
    }
    cmd = [WORKER, "--config", CONFIG]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd + ["--threads", str(threads), "--metrics", metrics, "--fresh"]


def torch_cmd(python, s, steps, warmup_steps, threads, out):
    arch = ["--arch", s["arch"]]
    if s["arch"] == "llama":
        arch += ["--kv-heads", str(s["kv_heads"]), "--theta", str(s["theta"]),
                 "--norm-eps", str(s["norm_eps"])]
    return [python, TORCH_STEP, *arch,
            "--layers", str(s["layers"]), "--hidden", str(s["hidden"]), "--heads", str(s["heads"]),
            "--ffn", str(s["ffn"]), "--seq", str(s["seq"]), "--vocab", str(s["vocab"]),
            "--global-batch", str(s["global_batch"]), "--micro-batch", str(s["micro_batch"]),
            "--steps", str(steps), "--warmup-steps", str(warmup_steps), "--threads", str(threads),
            "--lr", str(OPTIM["lr"]), "--min-lr", str(OPTIM["min_lr"]),
            "--lr-warmup", str(OPTIM["warmup"]), "--weight-decay", str(OPTIM["weight_decay"]),
            "--grad-clip", str(OPTIM["grad_clip"]), "--seed", str(SEED), "--out", out]


def run_logged(label, cmd, log):
    """Runs cmd with its output in `log`; stops the benchmark if it fails. Returns wall seconds."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write(Path(log).read_text(errors="replace")[-4000:])
        sys.exit(f"harness.py: {label}: exit status {p.returncode} from {shlex.join(cmd)}")
    return dt


def shown(cmd, tmp):
    """The command as a reader would type it: temporary paths made generic."""
    return shlex.join(cmd).replace(str(tmp), "$TMP")


def cmd_run(a):
    s = SIZES[a.size]
    d = Path(a.dir)
    steps = a.warmup_steps + a.steps
    metrics = d / f"{a.size}.metrics.jsonl"
    metrics.unlink(missing_ok=True)  # the worker appends
    ckpt = d / f"{a.size}.ckpt"
    print(f"== {a.size}: {describe(s)}; {steps} steps ({a.warmup_steps} warm-up), "
          f"{a.threads} threads", flush=True)

    if via_launch(s):
        config = write_job_config(s, a.size, steps, d)
        cmd, label = launch_cmd(config, a.threads, str(metrics)), "launch"
    else:
        cmd, label = worker_cmd(s, steps, a.threads, str(metrics), str(ckpt)), "tessera-worker"
    wall = run_logged(f"{a.size} {label}", cmd, d / f"{a.size}.ours.log")
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    if len(rows) != steps:
        sys.exit(f"harness.py: {a.size}: the worker wrote {len(rows)} metrics lines, expected {steps}")
    tps = [r["tokens_per_s"] for r in rows[a.warmup_steps:]]
    ours = {
        "side": "ours", "size": a.size, "model": s, "cmd": shown(cmd, d),
        "tokens_per_step": s["global_batch"] * s["seq"], "steps": steps,
        "warmup_steps": a.warmup_steps, "median_tokens_per_s": statistics.median(tps),
        "tokens_per_s": tps, "losses": [r["loss"] for r in rows], "wall_s": wall,
    }
    if via_launch(s):
        ours["config"] = config.read_text().replace(str(d), "$TMP")
    (d / f"{a.size}.ours.json").write_text(json.dumps(ours, indent=1))
    print(f"  tessera: median {ours['median_tokens_per_s']:.0f} tok/s "
          f"(min {min(tps):.0f}, max {max(tps):.0f}); loss {ours['losses'][0]:.4f} -> "
          f"{ours['losses'][-1]:.4f}", flush=True)

    out = d / f"{a.size}.torch.json"
    cmd = torch_cmd(a.python, s, steps, a.warmup_steps, a.threads, str(out))
    wall = run_logged(f"{a.size} torch_step.py", cmd, d / f"{a.size}.torch.log")
    peer = json.loads(out.read_text())
    peer.update(size=a.size, model=s, cmd=shown(cmd, d), wall_s=wall)
    out.write_text(json.dumps(peer, indent=1))
    tps = peer["tokens_per_s"]
    print(f"  pytorch: median {peer['median_tokens_per_s']:.0f} tok/s "
          f"(min {min(tps):.0f}, max {max(tps):.0f}); loss {peer['losses'][0]:.4f} -> "
          f"{peer['losses'][-1]:.4f}", flush=True)
    print(f"  ratio ours/pytorch: {ours['median_tokens_per_s'] / peer['median_tokens_per_s']:.2f}",
          flush=True)


def cmd_report(a):
    d = Path(a.dir)
    meta = dict(kv.split("=", 1) for kv in a.meta)
    done = [n for n in SIZES if (d / f"{n}.ours.json").exists() and (d / f"{n}.torch.json").exists()]
    if not done:
        sys.exit(f"harness.py report: no results in {d}")
    res = {n: (json.loads((d / f"{n}.ours.json").read_text()),
               json.loads((d / f"{n}.torch.json").read_text())) for n in done}

    head = ("size", "model, batch = micro-batches x size", "ours tok/s", "torch tok/s",
            "ours/torch", "loss ours (first -> last)", "loss torch (first -> last)")
    rows = []
    for n in done:
        o, t = res[n]
        rows.append((n, describe(o["model"]), f"{o['median_tokens_per_s']:.0f}",
                     f"{t['median_tokens_per_s']:.0f}",
                     f"{o['median_tokens_per_s'] / t['median_tokens_per_s']:.2f}",
                     f"{o['losses'][0]:.3f} -> {o['losses'][-1]:.3f}",
                     f"{t['losses'][0]:.3f} -> {t['losses'][-1]:.3f}"))
    w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    numeric = {2, 3, 4}
    text = "\n".join("  ".join(c.rjust(w[i]) if i in numeric else c.ljust(w[i])
                               for i, c in enumerate(r)) for r in [head] + rows)
    print(text)
    o0, t0 = res[done[0]]
    print(f"\n{meta.get('threads', '?')} threads; medians over {o0['steps'] - o0['warmup_steps']} "
          f"steps after {o0['warmup_steps']} warm-up; target ours/torch >= 1.0")
    if not a.md:
        return

    md_table = ("| " + " | ".join(head) + " |\n|---|---|---:|---:|---:|---|---|\n"
                + "\n".join("| " + " | ".join(r) + " |" for r in rows))
    spread = []
    for n in done:
        o, t = res[n]
        spread.append(f"| {n} | {min(o['tokens_per_s']):.0f} - {max(o['tokens_per_s']):.0f} | "
                      f"{min(t['tokens_per_s']):.0f} - {max(t['tokens_per_s']):.0f} | "
                      f"{o['wall_s']:.1f} | {t['wall_s']:.1f} |")
    lines = [
        f"# CPU training step: tessera vs PyTorch, {meta.get('date', '')}",
        "",
        "Measured by `bench/cpu_step/run.sh` (see bench/cpu_step/README.md): for each size, whole "
        "optimizer steps (forward and backward of every micro-batch, gradient clipping, AdamW) "
        "of the same fp32 model with the same batch and thread count, ours (`tessera-worker` for "
        "GPT-2, `launch` on one rank for llama; the worker's own `tokens_per_s` metric) then "
        "PyTorch's (`torch_step.py`: plain PyTorch for GPT-2, transformers' `LlamaForCausalLM` "
        "for llama; `time.perf_counter` around each step). Tokens/s is the median over "
        f"{o0['steps'] - o0['warmup_steps']} "
        f"steps after {o0['warmup_steps']} warm-up steps; ratio = ours / PyTorch (target >= 1.0).",
        "",
        "## Machine",
        "",
        f"- CPU: {meta.get('cpu', '?')}, {meta.get('nproc', '?')} cores (`nproc`), "
        f"{meta.get('arch', '?')}; load average {meta.get('load', '?')}",
        f"- OS: {meta.get('os', '?')}",
        f"- tessera commit: {meta.get('commit', '?')}; {meta.get('rustc', '?')}",
        f"- Python {t0.get('python', '?')}; torch {t0.get('torch', '?')} "
        f"({meta.get('torch_source', '?')}); CPU capability {t0.get('cpu_capability', '?')}; "
        f"AdamW: {t0.get('adamw', '?')}"
        + next((f"; transformers {t['transformers']} ({t['attention']})"
                for _, t in res.values() if "transformers" in t), ""),
        f"- Threads: {meta.get('threads', '?')} on both sides (worker `--threads`; torch "
        f"`set_num_threads({t0.get('threads', '?')})`, `set_num_interop_threads"
        f"({t0.get('interop_threads', '?')})`)",
        "",
        "## Results",
        "",
        f"Command: `{meta.get('command', '?')}`",
        "",
        md_table,
        "",
        "Losses are the mean training loss of the first and the last step. Both sides train on "
        "synthetic Markov-chain data with the same statistics (entropy rate 0.914 nats) but not "
        "the same tokens or initial weights, so the losses should be alike, not equal.",
        "",
        "Spread of the measured steps (tokens/s, min - max) and wall time of each process "
        "(start-up and warm-up included):",
        "",
        "| size | ours tok/s | torch tok/s | ours wall s | torch wall s |",
        "|---|---:|---:|---:|---:|",
        *spread,
        "",
    ]
    lines += ["## Commands", ""]
    for n in done:
        o, t = res[n]
        lines += [f"- {n}, ours: `{o['cmd']}`", f"- {n}, torch: `{t['cmd']}`"]
    for n in done:
        if "config" in res[n][0]:
            lines += ["", f"{n}, ours' config (`$TMP/{n}.yaml`):", "", "```yaml",
                      res[n][0]["config"].rstrip(), "```"]
    lines.append("")
    Path(a.md).write_text("\n".join(lines))
    print(f"\nwrote {a.md}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="sub", required=True)
    sub.add_parser("sizes")
    n = sub.add_parser("needs")
    n.add_argument("names", nargs="+", choices=list(SIZES), metavar="SIZE")
    c = sub.add_parser("config")
    c.add_argument("--size", required=True, choices=[k for k, v in SIZES.items() if via_launch(v)])
    c.add_argument("--steps", type=int, required=True)
    c.add_argument("--dir", required=True, help="where the run's checkpoint.dir would be")
    r = sub.add_parser("run")
    r.add_argument("--size", required=True, choices=list(SIZES))
    r.add_argument("--threads", type=int, required=True)
    r.add_argument("--steps", type=int, required=True, help="measured steps")
    r.add_argument("--warmup-steps", type=int, required=True)
    r.add_argument("--dir", required=True)
    r.add_argument("--python", required=True)
    p = sub.add_parser("report")
    p.add_argument("--dir", required=True)
    p.add_argument("--md")
    p.add_argument("--meta", action="append", default=[])
    a = ap.parse_args()
    if a.sub == "sizes":
        print("\n".join(SIZES))
    elif a.sub == "needs":
        print("\n".join(needs(a.names)))
    elif a.sub == "config":
        s = SIZES[a.size]
        print(yaml_text(job_config(s, a.steps, str(Path(a.dir) / f"{a.size}.ckpt"))))
    else:
        {"run": cmd_run, "report": cmd_report}[a.sub](a)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
