#!/usr/bin/env python3
"""Sizes and report for bench/gpu/run.sh (standard library only; no GPU, no torch needed).

  report.py sizes
      The benchmark sizes, one a line.

  report.py shape SIZE
      `config batch layers hidden heads seq_len vocab` of SIZE, for run.sh.

  report.py report --raw DIR [--raw DIR ...] [--md F.md] [--jsonl F.jsonl]
      Reads the raw outputs run.sh left in DIR (see "Raw files" below), prints the tables and,
      with --md / --jsonl, writes the results files. With several DIRs (a run split over
      several commands) a later DIR's run of a (size, side) replaces an earlier one's.

  report.py --self-test
      Feeds made-up raw outputs (fixtures inside this file, written only to a temporary folder)
      through the report and checks its arithmetic: parameter count, MFU, the medians, the
      ratios, the target verdicts and the failure rows.

Nothing here trusts a side's own MFU or memory arithmetic: MFU is recomputed from each side's
tokens/s and the model's shape with the formula of shared/reference/torch_gpt_ref.py,
(6 N + 12 L d T) FLOPs per token against PEAK_TFLOPS (989, H100 SXM bf16 dense), and the
worker's per-step tokens/s is checked against the wall clock between its step lines.

Raw files, per SIZE and SIDE (ours, eager, compile), written by run.sh into DIR:
  SIZE.SIDE.cmd           the command, shell-quoted
  SIZE.SIDE.out           stdout, each line prefixed with the epoch time it arrived (seconds)
  SIZE.SIDE.err           stderr
  SIZE.SIDE.rc            exit status (124 or 137: killed by `timeout`)
  SIZE.SIDE.time          epoch seconds at start and at end
  SIZE.SIDE.base          device memory used (MiB, nvidia-smi) just before the start
  SIZE.SIDE.smi           device memory used (MiB), one sample a line while it ran
  SIZE.ours.metrics.jsonl the worker's --metrics file
  meta.env                KEY=VALUE lines: date, device, driver, steps, warmup, ...
A side without a .rc file was not run.
"""
import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

# name -> the model and batch measured; the shapes of shared/reference/torch_gpt_ref.py's cfgs.
SIZES = {
    "124m": dict(config="configs/gpt2-124m.yaml", batch=16, layers=12, hidden=768, heads=12),
    "350m": dict(config="configs/gpt2-350m.yaml", batch=16, layers=24, hidden=1024, heads=16),
    "1.3b": dict(config="configs/gpt2-1.3b.yaml", batch=8, layers=24, hidden=2048, heads=16),
}
SEQ_LEN = 1024
VOCAB = 50257
VOCAB_PADDED = -(-VOCAB // 128) * 128  # 50304: what both sides' embedding holds
SIDES = ("ours", "eager", "compile")
PEAK_TFLOPS_DEFAULT = 989.0

TARGET_TOK_S = 1.1  # ours / torch.compile tokens per second, at least
TARGET_MEM = 0.8    # ours (arena + context) / eager max_memory_reserved, at most
# The worker's own per-step tokens/s and the wall clock between its step lines should agree
# within this (stdout timestamps carry a little jitter); beyond it the table says so.
WALL_TOLERANCE = 0.10
# Used only when nvidia-smi gave no samples for our run: the plan's CUDA context row
# (plan/src/memory.rs CUDA_CONTEXT_BYTES, measured by bench/gpu_runtime).
CUDA_CONTEXT_BYTES = 552_402_944
GIB = 1 << 30
MIB = 1 << 20


# ---------------------------------------------------------------------------------------------
# The model's arithmetic


def params(layers, hidden, vocab_padded=VOCAB_PADDED, seq_len=SEQ_LEN):
    """Parameters of the GPT of torch_gpt_ref.py (and of the worker's gpt2): token and position
    embeddings (the LM head is tied to the token embedding), per layer two LayerNorms (2d each),
    qkv (3d^2 + 3d), proj (d^2 + d), fc (4d^2 + 4d), fc2 (4d^2 + d), and the final LayerNorm."""
    d = hidden
    return vocab_padded * d + seq_len * d + layers * (12 * d * d + 13 * d) + 2 * d


def flops_per_token(layers, hidden, seq_len=SEQ_LEN):
    """6 N for the weights' forward and backward plus 12 L d T for causal attention's scores and
    values, as torch_gpt_ref.py and plan::model::flops_per_token count them."""
    return 6 * params(layers, hidden) + 12 * layers * hidden * seq_len


def mfu(tok_s, layers, hidden, peak_tflops):
    if tok_s is None:
        return None
    return tok_s * flops_per_token(layers, hidden) / (peak_tflops * 1e12)


# ---------------------------------------------------------------------------------------------
# Reading the raw files


def read(path):
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return None


def stamped_lines(text):
    """(epoch seconds, line) for each line of a stamped stdout file."""
    out = []
    for raw in (text or "").splitlines():
        stamp, _, line = raw.partition(" ")
        try:
            out.append((float(stamp), line))
        except ValueError:
            out.append((None, raw))
    return out


def read_meta(raw):
    meta = {}
    for line in (read(Path(raw) / "meta.env") or "").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            meta[key.strip()] = value.strip()
    return meta


def memory_peak_bytes(raw, stem, total_mib=None):
    """Max device memory used while the run went, less the idle baseline before it (bytes), or
    None when nvidia-smi gave no samples. Lines that are not a number of MiB up to the device's
    total (a torn line, an error message) are left out."""
    samples = []
    for line in (read(Path(raw) / f"{stem}.smi") or "").splitlines():
        try:
            value = float(line.strip())
        except ValueError:
            continue
        if value >= 0 and (total_mib is None or value <= total_mib):
            samples.append(value)
    base = (read(Path(raw) / f"{stem}.base") or "").strip()
    if not samples or not re.fullmatch(r"\d+(\.\d+)?", base):
        return None
    return int(max(0.0, max(samples) - float(base)) * MIB)


def total_mib(meta):
    try:
        return float(meta["memory_total_mib"])
    except (KeyError, ValueError):
        return None


def seconds(raw, stem):
    parts = (read(Path(raw) / f"{stem}.time") or "").split()
    try:
        return float(parts[1]) - float(parts[0])
    except (IndexError, ValueError):
        return None


def status_of_rc(raw, stem, meta):
    """None when the side was not run, else (rc, reason-if-killed)."""
    text = read(Path(raw) / f"{stem}.rc")
    if text is None:
        return None
    try:
        rc = int(text.strip())
    except ValueError:
        return (1, f"unreadable exit status `{text.strip()}`")
    if rc in (124, 137):
        return (rc, f"timed out after {meta.get('run_timeout', '?')} s (RUN_TIMEOUT)")
    return (rc, None)


def oneline(text, limit=300):
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_of_stderr(err, rc):
    """What a failed process said, in one line: the worker's `error:` (and `help:`) line, a Rust
    panic, a Python exception, or the last line of stderr."""
    lines = [l for l in (err or "").splitlines() if l.strip()]
    for i, line in enumerate(lines):
        if line.startswith("error:"):
            more = [l.strip() for l in lines[i + 1:i + 2] if l.strip().startswith("help:")]
            return oneline(" ".join([line[len("error:"):].strip()] + more))
    for i, line in enumerate(lines):
        if "panicked at" in line:
            return oneline("panic: " + " ".join(l.strip() for l in lines[i:i + 2]))
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line.strip()):
            return oneline(line.strip())
    if lines:
        return oneline(lines[-1].strip())
    return f"exit status {rc}, nothing on stderr"


def is_oom(text):
    t = (text or "").lower()
    return "out of memory" in t or "out_of_memory" in t or "outofmemory" in t


def parse_ours(raw, size, meta):
    stem = f"{size}.ours"
    status = status_of_rc(raw, stem, meta)
    if status is None:
        return {"status": "not run"}
    rc, killed = status
    shape = SIZES[size]
    warmup = int(meta.get("warmup", 3))
    out = read(Path(raw) / f"{stem}.out") or ""
    err = read(Path(raw) / f"{stem}.err") or ""
    res = {"status": "ok", "rc": rc, "seconds": seconds(raw, stem),
           "command": (read(Path(raw) / f"{stem}.cmd") or "").strip()}
    lines = stamped_lines(out)
    for _, line in lines:
        m = re.match(r"arena: (\d+) device \+ (\d+) host bytes", line)
        if m:
            res["arena_device_bytes"] = int(m.group(1))
            res["arena_host_bytes"] = int(m.group(2))
    rows = []
    for line in (read(Path(raw) / f"{size}.ours.metrics.jsonl") or "").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    measured = [r for r in rows if r.get("step", 0) > warmup and r.get("tokens_per_s")]
    res["steps"] = len(rows)
    res["steps_measured"] = len(measured)
    if rows:
        res["loss_first"] = rows[0].get("loss")
        res["loss_last"] = rows[-1].get("loss")
        res["peak_bytes"] = max(r.get("peak_bytes") or 0 for r in rows)
        res["worker_mfu"] = rows[-1].get("mfu")
    if measured:
        tps = [r["tokens_per_s"] for r in measured]
        res["tok_s"] = statistics.median(tps)
        res["tok_s_min"] = min(tps)
        res["tok_s_max"] = max(tps)

    # Cross-check: tokens between the end of the warm-up and the last step over the wall time
    # between the two step lines on stdout.
    steps_at = {}
    for stamp, line in lines:
        m = re.match(r"step\s+(\d+)/(\d+)", line)
        if m and stamp is not None:
            steps_at[int(m.group(1))] = stamp
    if steps_at:
        last = max(steps_at)
        first = warmup if warmup in steps_at else min(steps_at)
        if last > first and steps_at[last] > steps_at[first]:
            tokens = shape["batch"] * SEQ_LEN * (last - first)
            res["wall_tok_s"] = tokens / (steps_at[last] - steps_at[first])

    smi = memory_peak_bytes(raw, stem, total_mib(meta))
    res["device_peak_bytes"] = smi
    if smi is not None:
        res["mem_bytes"] = smi
        res["mem_source"] = "nvidia-smi: max used while running - idle baseline"
    elif "arena_device_bytes" in res:
        res["mem_bytes"] = res["arena_device_bytes"] + CUDA_CONTEXT_BYTES
        res["mem_source"] = "arena + planned CUDA context (nvidia-smi gave no samples)"

    if killed:
        res.update(status="failed", reason=killed)
    elif rc != 0:
        reason = error_of_stderr(err, rc)
        if is_oom(err) and "out of memory" not in reason.lower():
            reason = "out of memory: " + reason
        res.update(status="failed", reason=f"exit {rc}: {reason}")
    elif not measured:
        res.update(status="failed", reason=f"no step after the {warmup} warm-up steps in the "
                                          f"metrics file ({len(rows)} lines)")
    return res


def parse_torch(raw, size, side, meta):
    stem = f"{size}.{side}"
    status = status_of_rc(raw, stem, meta)
    if status is None:
        return {"status": "not run"}
    rc, killed = status
    res = {"status": "ok", "rc": rc, "seconds": seconds(raw, stem),
           "command": (read(Path(raw) / f"{stem}.cmd") or "").strip()}
    result = None
    for _, line in stamped_lines(read(Path(raw) / f"{stem}.out")):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "gpu" in obj and "torch" in obj:
            res["torch"] = obj.get("torch")
            res["gpu"] = obj.get("gpu")
        elif "name" in obj:
            result = obj
    res["device_peak_bytes"] = memory_peak_bytes(raw, stem, total_mib(meta))
    err = read(Path(raw) / f"{stem}.err") or ""
    if killed:
        res.update(status="failed", reason=killed)
    elif result is not None and result.get("oom"):
        res.update(status="failed", reason="out of memory (torch.cuda.OutOfMemoryError)")
    elif result is not None and "error" in result:
        reason = oneline(str(result["error"]))
        if is_oom(reason) and not reason.lower().startswith("out of memory"):
            reason = "out of memory: " + reason
        res.update(status="failed", reason=reason)
    elif rc != 0:
        reason = error_of_stderr(err, rc)
        res.update(status="failed", reason=f"exit {rc}: {reason}")
    elif result is None or "tok_per_s" not in result:
        res.update(status="failed", reason="no result line on stdout")
    if result is not None and "tok_per_s" in result:
        res["tok_s"] = float(result["tok_per_s"])
        res["step_ms"] = result.get("step_ms")
        res["reported_mfu"] = result.get("mfu")
        res["reported_params"] = result.get("params")
        res["loss"] = result.get("loss")
        if "peak_reserved_gib" in result:
            res["mem_bytes"] = int(round(result["peak_reserved_gib"] * GIB))
            res["mem_source"] = "torch.cuda.max_memory_reserved"
        if "peak_alloc_gib" in result:
            res["peak_alloc_bytes"] = int(round(result["peak_alloc_gib"] * GIB))
    return res


# ---------------------------------------------------------------------------------------------
# Aggregation


def merged_runs(raws):
    """(meta, {size: {side: parsed}}) over one or more raw folders, later ones winning."""
    meta, runs = {}, {}
    for raw in raws:
        m = read_meta(raw)
        for size in SIZES:
            for side in SIDES:
                parsed = (parse_ours(raw, size, m) if side == "ours"
                          else parse_torch(raw, size, side, m))
                if parsed["status"] != "not run" or side not in runs.get(size, {}):
                    parsed["raw"] = str(raw)
                    runs.setdefault(size, {})[side] = parsed
        meta.update(m)
    return meta, runs


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def aggregate(meta, runs):
    """One row per size that any side ran: every number the tables show, and the notes."""
    peak = float(meta.get("peak_tflops") or PEAK_TFLOPS_DEFAULT)
    rows = []
    for size, shape in SIZES.items():
        sides = runs.get(size, {})
        if all(sides.get(s, {}).get("status", "not run") == "not run" for s in SIDES):
            continue
        L, d = shape["layers"], shape["hidden"]
        row = {
            "date": meta.get("date"), "device": meta.get("device"), "driver": meta.get("driver"),
            "size": size, "batch": shape["batch"], "seq_len": SEQ_LEN, "layers": L, "hidden": d,
            "heads": shape["heads"], "vocab": VOCAB, "vocab_padded": VOCAB_PADDED,
            "params": params(L, d), "flops_per_token": flops_per_token(L, d),
            "peak_tflops": peak, "steps": meta.get("steps"), "warmup": meta.get("warmup"),
        }
        notes = []
        for side in SIDES:
            s = dict(sides.get(side, {"status": "not run"}))
            ok = s["status"] == "ok"
            s["mfu"] = mfu(s.get("tok_s"), L, d, peak) if ok else None
            if not ok:
                if s["status"] == "failed":
                    notes.append(f"{side} failed: {s.get('reason')}")
                row[side] = s
                continue
            rep = s.get("reported_mfu")
            if rep is not None and s["mfu"] and abs(rep - s["mfu"]) > 0.005 + 0.01 * s["mfu"]:
                notes.append(f"{side}: its own MFU {rep:.4f} differs from the recomputed "
                             f"{s['mfu']:.4f} (PEAK_TFLOPS or parameter count differs?)")
            if s.get("reported_params") not in (None, row["params"]):
                notes.append(f"{side}: {s['reported_params']:,} parameters, the shape gives "
                             f"{row['params']:,}")
            if side == "ours":
                wall = s.get("wall_tok_s")
                if wall and abs(s["tok_s"] / wall - 1) > WALL_TOLERANCE:
                    notes.append(f"ours: the worker's median {s['tok_s']:,.0f} tok/s and the wall "
                                 f"clock between its step lines ({wall:,.0f} tok/s) differ by "
                                 f"more than {WALL_TOLERANCE:.0%}; trust the wall clock")
                if s.get("device_peak_bytes") is None and "mem_bytes" in s:
                    notes.append("ours: no nvidia-smi samples; memory is arena + planned context")
            row[side] = s
        o, e, c = row["ours"], row["eager"], row["compile"]
        ok = lambda s: s["status"] == "ok"  # noqa: E731
        row["ours_over_compile_tok_s"] = (ratio(o.get("tok_s"), c.get("tok_s"))
                                          if ok(o) and ok(c) else None)
        row["ours_over_eager_tok_s"] = (ratio(o.get("tok_s"), e.get("tok_s"))
                                        if ok(o) and ok(e) else None)
        row["ours_over_eager_mem"] = (ratio(o.get("mem_bytes"), e.get("mem_bytes"))
                                      if ok(o) and ok(e) else None)
        r = row["ours_over_compile_tok_s"]
        row["tok_s_target"] = TARGET_TOK_S
        row["tok_s_target_met"] = None if r is None else r >= TARGET_TOK_S
        r = row["ours_over_eager_mem"]
        row["mem_target"] = TARGET_MEM
        row["mem_target_met"] = None if r is None else r <= TARGET_MEM
        row["notes"] = notes
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Rendering


def cell_tok(s):
    if s["status"] == "not run":
        return "not run"
    if s["status"] != "ok":
        return "**failed**"
    return f"{s['tok_s']:,.0f}"


def cell_mfu(s):
    return f"{s['mfu'] * 100:.1f}%" if s.get("mfu") is not None else "-"


def cell_gib(s, key="mem_bytes"):
    if s["status"] == "not run":
        return "not run"
    if s["status"] != "ok":
        return "**failed**"
    v = s.get(key)
    return f"{v / GIB:.2f}" if v is not None else "?"


def cell_ratio(r):
    return f"{r:.2f}" if r is not None else "-"


def verdict(met, why):
    if met is None:
        return f"n/a ({why})"
    return "yes" if met else "**no**"


def why_missing(row, sides):
    bad = [s for s in sides if row[s]["status"] != "ok"]
    return ", ".join(f"{s} {row[s]['status']}" for s in bad) or "no number"


def markdown_tables(rows):
    t = ["| size | batch x T | ours tok/s | ours MFU | eager tok/s | eager MFU | compile tok/s "
         "| compile MFU | ours / compile | >= 1.1? |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        o, e, c = r["ours"], r["eager"], r["compile"]
        t.append(f"| {r['size']} | {r['batch']} x {r['seq_len']} | {cell_tok(o)} | {cell_mfu(o)} "
                 f"| {cell_tok(e)} | {cell_mfu(e)} | {cell_tok(c)} | {cell_mfu(c)} "
                 f"| {cell_ratio(r['ours_over_compile_tok_s'])} "
                 f"| {verdict(r['tok_s_target_met'], why_missing(r, ('ours', 'compile')))} |")
    m = ["| size | ours: arena + context GiB | ours: arena GiB | eager: reserved GiB "
         "| compile: reserved GiB | ours / eager | <= 0.8? |",
         "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        o, e, c = r["ours"], r["eager"], r["compile"]
        m.append(f"| {r['size']} | {cell_gib(o)} | {cell_gib(o, 'arena_device_bytes')} "
                 f"| {cell_gib(e)} | {cell_gib(c)} | {cell_ratio(r['ours_over_eager_mem'])} "
                 f"| {verdict(r['mem_target_met'], why_missing(r, ('ours', 'eager')))} |")
    return "\n".join(t), "\n".join(m)


def md_escape(text):
    return str(text).replace("|", "\\|").replace("`", "'")


def detail_lines(rows):
    out = []
    for r in rows:
        o, e, c = r["ours"], r["eager"], r["compile"]
        out.append(f"**{r['size']}** (L{r['layers']} d{r['hidden']} h{r['heads']}, "
                   f"{r['params']:,} parameters, {r['flops_per_token'] / 1e9:.3f} GFLOP/token):")
        if o["status"] != "not run":
            bits = []
            if o.get("tok_s") is not None:
                bits.append(f"median {o['tok_s']:,.0f} tok/s over {o['steps_measured']} steps "
                            f"(min {o['tok_s_min']:,.0f}, max {o['tok_s_max']:,.0f})")
            if o.get("wall_tok_s"):
                bits.append(f"wall clock {o['wall_tok_s']:,.0f} tok/s")
            if o.get("arena_device_bytes") is not None:
                bits.append(f"arena {o['arena_device_bytes']:,} device + "
                            f"{o.get('arena_host_bytes', 0):,} host bytes")
            if o.get("peak_bytes"):
                bits.append(f"peak_bytes {o['peak_bytes']:,}")
            if o.get("device_peak_bytes") is not None:
                bits.append(f"nvidia-smi {o['device_peak_bytes'] / GIB:.2f} GiB over idle")
            if o.get("loss_first") is not None:
                bits.append(f"loss {o['loss_first']:.3f} -> {o['loss_last']:.3f}")
            if o.get("seconds") is not None:
                bits.append(f"process {o['seconds']:.0f} s")
            out.append(f"- ours: {'; '.join(bits) or o['status']}")
        for name, s in (("eager", e), ("compile", c)):
            if s["status"] == "not run":
                continue
            bits = []
            if s.get("tok_s") is not None:
                bits.append(f"{s['tok_s']:,.0f} tok/s ({s.get('step_ms')} ms/step, mean)")
            if s.get("peak_alloc_bytes") is not None:
                bits.append(f"max allocated {s['peak_alloc_bytes'] / GIB:.2f} GiB")
            if s.get("device_peak_bytes") is not None:
                bits.append(f"nvidia-smi {s['device_peak_bytes'] / GIB:.2f} GiB over idle")
            if s.get("loss") is not None:
                bits.append(f"loss {s['loss']}")
            if s.get("seconds") is not None:
                bits.append(f"process {s['seconds']:.0f} s (compile included)" if name == "compile"
                            else f"process {s['seconds']:.0f} s")
            out.append(f"- {name}: {'; '.join(bits) or s['status']}")
        for note in r["notes"]:
            out.append(f"- note: {md_escape(note)}")
        out.append("")
    return out


def markdown(meta, rows):
    tput, mem = markdown_tables(rows)
    steps, warm = meta.get("steps", "?"), meta.get("warmup", "?")
    peak = meta.get("peak_tflops") or PEAK_TFLOPS_DEFAULT
    lines = [
        f"# GPU training step: tessera-worker vs PyTorch eager and torch.compile, "
        f"{meta.get('date', '?')}",
        "",
        "Measured by `bench/gpu/run.sh` (see bench/gpu/README.md): GPT-2 shapes at T=1024, "
        "vocabulary 50257 padded to 50304, bf16, AdamW, one GPU, synthetic tokens; one process "
        "per size and side, in turn. Ours: `tessera-worker`, median of its per-step "
        f"`tokens_per_s` over {steps} steps after {warm} warm-up steps. PyTorch: "
        "shared/reference/torch_gpt_ref.py's `run` (bf16 autocast, fused AdamW), mean over "
        f"{steps} steps after {warm} warm-up steps. MFU is recomputed here for both sides: "
        f"tok/s x (6 N + 12 L d T) / {float(peak):g} TFLOP/s.",
        "",
        "## Machine",
        "",
        f"- GPU: {meta.get('device', '?')}, {meta.get('memory_total_mib', '?')} MiB, "
        f"driver {meta.get('driver', '?')}; idle memory used before the run "
        f"{meta.get('idle_mib', '?')} MiB",
        f"- Host: {meta.get('host', '?')}",
        f"- tessera: commit {meta.get('commit', '?')}; worker {meta.get('worker', '?')} "
        f"(sha256 {meta.get('worker_sha256', '?')[:16]}, {meta.get('worker_version', '?')})",
        f"- PyTorch: {meta.get('torch', '?')} ({meta.get('torch_py', '?')}); reference "
        f"{meta.get('torch_ref', '?')}",
        f"- Command: `{meta.get('command', '?')}`",
        "",
        "## Throughput",
        "",
        tput,
        "",
        f"Target: ours / torch.compile >= {TARGET_TOK_S}.",
        "",
        "## Memory",
        "",
        mem,
        "",
        "Ours is the device memory the worker's process took (nvidia-smi's max `memory.used` "
        "while it ran, less the idle baseline just before: the arena, the CUDA context and the "
        "libraries' workspaces); the arena column is the planned allocation the worker printed. "
        "PyTorch's is `torch.cuda.max_memory_reserved()` (its caching allocator, without its "
        f"CUDA context). Target: ours / eager <= {TARGET_MEM}.",
        "",
        "## Per size",
        "",
        *detail_lines(rows),
    ]
    return "\n".join(lines)


def jsonl(rows):
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def console(rows):
    tput, mem = markdown_tables(rows)
    text = tput + "\n\n" + mem + "\n"
    notes = [f"{r['size']}: {n}" for r in rows for n in r["notes"]]
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    return text


def cmd_report(a):
    raws = [Path(r) for r in a.raw]
    for r in raws:
        if not r.is_dir():
            sys.exit(f"report.py: raw folder {r} does not exist")
    meta, runs = merged_runs(raws)
    rows = aggregate(meta, runs)
    if not rows:
        sys.exit(f"report.py: no run of any size in {', '.join(map(str, raws))}")
    print(console(rows))
    if a.md:
        Path(a.md).write_text(markdown(meta, rows))
        print(f"wrote {a.md}")
    if a.jsonl:
        Path(a.jsonl).write_text(jsonl(rows))
        print(f"wrote {a.jsonl}")
    failed = any(r[s]["status"] == "failed" for r in rows for s in SIDES)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# Self-test: made-up raw outputs through the whole report. TEST FIXTURES ONLY: the numbers
# below are invented to exercise the arithmetic; they are written to a temporary folder and
# never to bench/results/.


def _fixture_dir(tmp):
    raw = Path(tmp) / "raw"
    raw.mkdir()
    w = lambda name, text: (raw / name).write_text(text)  # noqa: E731
    w("meta.env", "\n".join([
        "date=2099-01-01", "device=TEST FIXTURE GPU", "driver=0.0", "steps=4", "warmup=3",
        "peak_tflops=989", "run_timeout=300", "memory_total_mib=81559", "command=bench/gpu/run.sh (self-test)"]) + "\n")

    # 124m, ours: arena line, 7 steps of which 3 warm-up (the huge warm-up numbers must not
    # count), step lines stamped 0.03 s apart (16 x 1024 tokens / 0.03 s = 546,133 tok/s).
    arena = 6_812_000_000
    tps = [1.0, 9e9, 9e9, 500_000.0, 560_000.0, 540_000.0, 550_000.0]
    metrics, out = [], [f"100.000 arena: {arena} device + 0 host bytes, as planned"]
    for i, t in enumerate(tps, 1):
        metrics.append(json.dumps({"step": i, "loss": 10.9 - 0.1 * i, "lr": 1e-5,
                                   "grad_norm": 1.0, "tokens_per_s": t, "mfu": None,
                                   "peak_bytes": arena}))
        out.append(f"{100 + 0.03 * i:.3f} step {i:>6}/7 | loss {10.9 - 0.1 * i:.6f} | "
                   f"{t:.0f} tok/s")
    w("124m.ours.metrics.jsonl", "\n".join(metrics) + "\n")
    w("124m.ours.out", "\n".join(out) + "\n")
    w("124m.ours.err", "warning: data.path is ignored with data.kind: synthetic\n")
    w("124m.ours.rc", "0\n")
    w("124m.ours.time", "99.0 101.0\n")
    w("124m.ours.base", "480\n")
    # peak 7480 - 480 = 7000 MiB; a torn line (two samples run together) is left out.
    w("124m.ours.smi", "480\n3000\n4807400\n7400\n7480\n7480\n500\n")
    w("124m.ours.cmd", "target/release/tessera-worker --config configs/gpt2-124m.yaml\n")

    def torch_out(name, tok, reserved, compile_, mfu_=None, params_=124475904):
        head = {"gpu": "TEST FIXTURE GPU", "torch": "0.0+fixture", "nccl": "0", "total_gib": 79}
        res = {"name": name, "L": 12, "d": 768, "heads": 12, "B": 16, "T": 1024,
               "ckpt": False, "compile": compile_, "params": params_,
               "step_ms": round(16384 / tok * 1e3, 2), "tok_per_s": tok,
               "mfu": mfu_ if mfu_ is not None else round(tok * 860101632 / 989e12, 4),
               "hfu": 0.0, "mem_after_init_gib": 0.5, "peak_alloc_gib": reserved - 0.5,
               "peak_reserved_gib": reserved, "loss": 71.65}
        return f"200.0 {json.dumps(head)}\n201.0 {json.dumps(res)}\n"

    # 124m eager: 306,623 tok/s (the shared reference's H100 eager number) and 16.717 GiB.
    w("124m.eager.out", torch_out("124m-b16", 306623, 16.717, False))
    w("124m.eager.rc", "0\n")
    w("124m.eager.base", "480\n")
    w("124m.eager.smi", "480\n17700\n")
    # 124m compile: 500,000 tok/s; 8.5 GiB.
    w("124m.compile.out", torch_out("124m-b16-compile", 500000, 8.5, True))
    w("124m.compile.rc", "0\n")

    # 350m: ours ran out of memory (exit 1 with the worker's error line); eager fine; compile
    # OOM as torch_gpt_ref.py reports it (exit 0, {"oom": true}).
    w("350m.ours.out", "300.0 arena: 19000000000 device + 0 host bytes, as planned\n")
    w("350m.ours.err", "error: CUDA out of memory allocating 1073741824 bytes for workspace\n"
                       "  help: lower training.micro_batch\n")
    w("350m.ours.rc", "1\n")
    w("350m.eager.out", torch_out("350m-b16", 142822, 29.586, False, params_=354871296,
                                  mfu_=0.3511))
    w("350m.eager.rc", "0\n")
    w("350m.compile.out", '300.0 {"gpu": "x", "torch": "y"}\n'
                          '301.0 {"name": "350m-b16-compile", "oom": true}\n')
    w("350m.compile.rc", "0\n")

    # 1.3b: ours timed out; torch not run (as with --ours-only).
    w("1.3b.ours.out", "")
    w("1.3b.ours.err", "")
    w("1.3b.ours.rc", "124\n")
    return raw


def self_test():
    failures = []

    def check(what, got, want, tol=0.0):
        if isinstance(want, float) or tol:
            good = got is not None and abs(got - want) <= tol
        else:
            good = got == want
        if not good:
            failures.append(f"{what}: got {got!r}, want {want!r}")

    # Parameter counts and MFU against shared/reference/torch_gpt_ref_h100.jsonl's own lines.
    check("params 124m", params(12, 768), 124475904)
    check("params 350m", params(24, 1024), 354871296)
    check("params 1.3b", params(24, 2048), 1313722368)  # also the worker's dry-run count
    check("vocab padded", VOCAB_PADDED, 50304)
    check("flops/token 124m", flops_per_token(12, 768), 6 * 124475904 + 12 * 12 * 768 * 1024)
    check("mfu 124m eager ref", round(mfu(306623, 12, 768, 989), 4), 0.2667, 1e-9)
    check("mfu 350m eager ref", round(mfu(142822, 24, 1024, 989), 4), 0.3511, 1e-9)
    check("mfu 1.3b eager ref", round(mfu(51166, 24, 2048, 989), 4), 0.4390, 1e-9)
    check("mfu 1.3b compile ref", round(mfu(57629, 24, 2048, 989), 4), 0.4945, 1e-9)
    check("error line", error_of_stderr("warning: x\nerror: bad thing\n  help: do y\n", 2),
          "bad thing help: do y")
    check("panic line", error_of_stderr("thread 'main' panicked at src/x.rs:1:2:\nboom\n", 101),
          "panic: thread 'main' panicked at src/x.rs:1:2: boom")
    check("python error", error_of_stderr("Traceback\n  File x\nRuntimeError: CUDA error\n", 1),
          "RuntimeError: CUDA error")

    with tempfile.TemporaryDirectory(prefix="tessera-gpu-selftest-") as tmp:
        raw = _fixture_dir(tmp)
        meta, runs = merged_runs([raw])
        rows = {r["size"]: r for r in aggregate(meta, runs)}
        check("sizes with a row", sorted(rows), ["1.3b", "124m", "350m"])

        r = rows["124m"]
        o, e, c = r["ours"], r["eager"], r["compile"]
        check("124m ours status", o["status"], "ok")
        check("124m ours median (warm-up left out)", o["tok_s"],
              statistics.median([500_000.0, 560_000.0, 540_000.0, 550_000.0]))
        check("124m ours measured steps", o["steps_measured"], 4)
        check("124m ours wall tok/s", o["wall_tok_s"], 16384 * 4 / 0.12, 1.0)
        check("124m ours mfu", o["mfu"], 545_000 * 860101632 / 989e12, 1e-12)
        check("124m ours memory from nvidia-smi", o["mem_bytes"], 7000 * MIB)
        check("124m ours arena", o["arena_device_bytes"], 6_812_000_000)
        check("124m eager mfu", round(e["mfu"], 4), 0.2667, 1e-9)
        check("124m eager memory", e["mem_bytes"], int(round(16.717 * GIB)))
        check("124m eager nvidia-smi", e["device_peak_bytes"], (17700 - 480) * MIB)
        check("124m ours/compile", r["ours_over_compile_tok_s"], 545_000 / 500_000, 1e-12)
        check("124m tok/s target", r["tok_s_target_met"], False)  # 1.09 < 1.1
        check("124m ours/eager mem", r["ours_over_eager_mem"],
              7000 * MIB / int(round(16.717 * GIB)), 1e-12)
        check("124m mem target", r["mem_target_met"], True)       # 0.41 <= 0.8
        check("124m notes (wall agrees, MFUs agree)", r["notes"], [])

        r = rows["350m"]
        check("350m ours failed", r["ours"]["status"], "failed")
        check("350m ours reason", r["ours"]["reason"],
              "exit 1: CUDA out of memory allocating 1073741824 bytes for workspace "
              "help: lower training.micro_batch")
        check("350m compile oom", r["compile"]["reason"],
              "out of memory (torch.cuda.OutOfMemoryError)")
        check("350m eager ok", r["eager"]["status"], "ok")
        check("350m eager mfu recomputed", round(r["eager"]["mfu"], 4), 0.3511, 1e-9)
        check("350m no ratios", (r["ours_over_compile_tok_s"], r["ours_over_eager_mem"]),
              (None, None))
        check("350m no verdicts", (r["tok_s_target_met"], r["mem_target_met"]), (None, None))
        check("350m failure notes", len(r["notes"]), 2)

        r = rows["1.3b"]
        check("1.3b ours timeout", r["ours"]["reason"], "timed out after 300 s (RUN_TIMEOUT)")
        check("1.3b torch not run", (r["eager"]["status"], r["compile"]["status"]),
              ("not run", "not run"))

        # A run that meets the throughput target, and the wall-clock disagreement note.
        runs2 = {"124m": {"ours": dict(runs["124m"]["ours"], tok_s=600_000.0,
                                       wall_tok_s=400_000.0),
                          "eager": runs["124m"]["eager"], "compile": runs["124m"]["compile"]}}
        good = aggregate(meta, runs2)[0]
        check("ratio 1.2", good["ours_over_compile_tok_s"], 1.2, 1e-12)
        check("target met at 1.2", good["tok_s_target_met"], True)
        check("wall note", any("wall clock" in n for n in good["notes"]), True)

        # A later raw folder replaces the sides it ran, and only those.
        raw2 = Path(tmp) / "raw2"
        raw2.mkdir()
        (raw2 / "meta.env").write_text("date=2099-01-02\nsteps=4\nwarmup=3\n")
        (raw2 / "350m.ours.out").write_text(
            "1.0 arena: 30000000000 device + 0 host bytes, as planned\n"
            + "".join(f"{1 + 0.1 * i:.1f} step {i}/5 | x\n" for i in range(1, 6)))
        (raw2 / "350m.ours.metrics.jsonl").write_text("".join(
            json.dumps({"step": i, "loss": 11.0, "tokens_per_s": 163840.0,
                        "peak_bytes": 30000000000}) + "\n" for i in range(1, 6)))
        (raw2 / "350m.ours.rc").write_text("0\n")
        meta3, runs3 = merged_runs([raw, raw2])
        r = {x["size"]: x for x in aggregate(meta3, runs3)}["350m"]
        check("merged: ours from the second folder", r["ours"]["status"], "ok")
        check("merged: eager kept from the first", r["eager"]["tok_s"], 142822.0)
        check("merged: memory falls back to arena + context", r["ours"]["mem_bytes"],
              30_000_000_000 + CUDA_CONTEXT_BYTES)
        check("merged: wall tok/s", r["ours"]["wall_tok_s"], 16384 * 2 / 0.2, 1e-3)
        check("merged: ratio ours/eager mem",
              r["ours_over_eager_mem"],
              (30_000_000_000 + CUDA_CONTEXT_BYTES) / int(round(29.586 * GIB)), 1e-12)
        check("merged: mem target", r["mem_target_met"], False)

        # The rendered files: verdict words, failure cells, and JSON lines that parse.
        md = markdown(meta, aggregate(meta, runs))
        for needle in ("| 124m | 16 x 1024 | 545,000 | 47.4% | 306,623 | 26.7% | 500,000 | "
                       "43.5% | 1.09 | **no** |",
                       "| 124m | 6.84 | 6.34 | 16.72 | 8.50 | 0.41 | yes |",
                       "| 350m | 16 x 1024 | **failed** | - | 142,822 | 35.1% | **failed** | - "
                       "| - | n/a (ours failed, compile failed) |",
                       "| 1.3b | 8 x 1024 | **failed** | - | not run | - | not run | - | - | "
                       "n/a (ours failed, compile not run) |",
                       "ours failed: timed out after 300 s (RUN_TIMEOUT)",
                       "compile failed: out of memory (torch.cuda.OutOfMemoryError)"):
            if needle not in md:
                failures.append(f"markdown lacks: {needle}")
        lines = jsonl(aggregate(meta, runs)).splitlines()
        check("jsonl lines", len(lines), 3)
        first = json.loads(lines[0])
        check("jsonl device", first["device"], "TEST FIXTURE GPU")
        check("jsonl target flag", first["tok_s_target_met"], False)
        out_md, out_jl = Path(tmp) / "t.md", Path(tmp) / "t.jsonl"
        ns = argparse.Namespace(raw=[str(raw)], md=str(out_md), jsonl=str(out_jl))
        devnull = open(os.devnull, "w")
        stdout, sys.stdout = sys.stdout, devnull
        try:
            rc = cmd_report(ns)
        finally:
            sys.stdout = stdout
            devnull.close()
        check("report exit status with failures", rc, 1)
        check("report wrote md", out_md.exists() and out_jl.exists(), True)

    if failures:
        print("report.py self-test FAILED:")
        for f in failures:
            print(f"  {f}")
        return 1
    print("report.py self-test: ok (parameter counts, MFU against the reference numbers, "
          "warm-up medians, wall-clock check, memory, ratios, verdicts, failure and merged rows)")
    return 0


def main():
    if sys.argv[1:] == ["--self-test"]:
        sys.exit(self_test())
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--self-test", action="store_true", help="check the arithmetic; no GPU")
    sub = ap.add_subparsers(dest="sub")
    sub.add_parser("sizes")
    s = sub.add_parser("shape")
    s.add_argument("size", choices=list(SIZES))
    p = sub.add_parser("report")
    p.add_argument("--raw", action="append", required=True, help="run.sh's raw folder")
    p.add_argument("--md")
    p.add_argument("--jsonl")
    a = ap.parse_args()
    if a.self_test:
        sys.exit(self_test())
    if a.sub == "sizes":
        print("\n".join(SIZES))
    elif a.sub == "shape":
        z = SIZES[a.size]
        print(z["config"], z["batch"], z["layers"], z["hidden"], z["heads"], SEQ_LEN, VOCAB)
    elif a.sub == "report":
        sys.exit(cmd_report(a))
    else:
        ap.print_help()
        sys.exit(2)


if __name__ == "__main__":
    main()
