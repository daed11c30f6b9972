#!/usr/bin/env python3
"""The peer of bench/cpu_step: the same GPT-2 or llama training step as tessera, in PyTorch on the
CPU in fp32 (run with the python of bench/torch_venv.sh's venv).

  torch_step.py [--arch gpt2] --layers L --hidden C --heads H --vocab V --seq T --ffn F \
      --global-batch G --micro-batch M --steps N --warmup-steps W --threads K --out F.json
  torch_step.py --arch llama --kv-heads KV --theta R --norm-eps E ... (the same flags)

`--arch gpt2` (the default) follows the worker's GPT-2 in plain PyTorch: learned positions,
pre-LayerNorm blocks, one fused qkv Linear, causal attention (F.scaled_dot_product_attention,
is_causal=True), GELU (tanh), the LM head tied to the token embedding, mean cross-entropy.
Initialisation as GPT-2 (normal 0.02, residual projections 0.02/sqrt(2L), biases 0, LayerNorm
weights 1). One optimizer step is G/M micro-batches of M sequences, each loss scaled by M/G (the
mean over the global batch, as the worker does), then clip_grad_norm_(1.0) and
torch.optim.AdamW (its CPU default implementation; betas 0.9/0.95, eps 1e-8, weight decay 0.1 on
matrices only) with the worker's learning-rate schedule (linear warmup, cosine to min_lr).

`--arch llama` trains Hugging Face transformers' own LlamaForCausalLM (needs transformers; torch's
scaled_dot_product_attention through attn_implementation="sdpa", so grouped-query attention in
torch's fused CPU kernel): RMSNorm (eps E), rotary embeddings (theta R, rotate-half), SwiGLU MLP of
width F, KV heads KV, no biases, an untied LM head, HF's initialisation (every matrix normal 0.02,
RMSNorm weights 1). The loss is the mean cross-entropy of its logits against the given targets;
batching, clipping, AdamW (weight decay on the matrices, not the RMSNorm weights) and the schedule
are the GPT-2 path's.

Data: a sparse Markov chain with the statistics of the worker's `synthetic` data (every token
has 4 likely successors with probabilities 70/15/10/5 %, entropy rate 0.914 nats), generated
before the first step, so the losses of both sides fall alike. Its tokens are not the worker's:
the losses are comparable, not equal.

Each step is timed with time.perf_counter from the first micro-batch to the end of
optimizer.step() and zero_grad(). Steps after the first W give tokens/s = G*T / step time; the
JSON has their median, every step's time and loss, and the versions used.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# The worker's `synthetic` data: likely successors per token and their weights (percent).
SUCCESSOR_WEIGHTS = (70, 15, 10, 5)
LAYERNORM_EPS = 1e-5  # the worker's LAYERNORM_EPS, and nn.LayerNorm's default


class Block(nn.Module):
    def __init__(self, c, heads, ffn):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(c, eps=LAYERNORM_EPS)
        self.qkv = nn.Linear(c, 3 * c)
        self.attproj = nn.Linear(c, c)
        self.ln2 = nn.LayerNorm(c, eps=LAYERNORM_EPS)
        self.fc = nn.Linear(c, ffn)
        self.fcproj = nn.Linear(ffn, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attproj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.fcproj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, layers, c, heads, ffn, vocab, seq):
        super().__init__()
        self.wte = nn.Embedding(vocab, c)
        self.wpe = nn.Embedding(seq, c)
        self.blocks = nn.ModuleList(Block(c, heads, ffn) for _ in range(layers))
        self.lnf = nn.LayerNorm(c, eps=LAYERNORM_EPS)
        self.head = nn.Linear(c, vocab, bias=False)
        self.head.weight = self.wte.weight
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith(("attproj.weight", "fcproj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * layers))
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.lnf(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def llama(a):
    """transformers' LlamaForCausalLM of the flags' size, fp32, sdpa attention, HF's own init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, max_position_embeddings=a.seq,
                      rms_norm_eps=a.norm_eps, rope_theta=a.theta, tie_word_embeddings=False,
                      attention_bias=False, mlp_bias=False, attn_implementation="sdpa",
                      use_cache=False)
    return LlamaForCausalLM(cfg).float()


class LlamaLoss(nn.Module):
    """Mean cross-entropy of a LlamaForCausalLM's logits against targets (already shifted)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        logits = self.model(input_ids=idx, use_cache=False).logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def markov_tokens(vocab, rows, seq, gen):
    """`rows` sequences of seq+1 tokens of a chain in which every token has len(SUCCESSOR_WEIGHTS)
    distinct likely successors (fewer for tiny vocabularies); returns (inputs, targets)."""
    slots = min(len(SUCCESSOR_WEIGHTS), vocab)
    succ = torch.randint(0, vocab, (vocab, slots), generator=gen)
    while True:  # redraw rows with a repeated successor until all are distinct
        s, _ = succ.sort(dim=1)
        bad = (s[:, 1:] == s[:, :-1]).any(dim=1)
        if not bad.any():
            break
        succ[bad] = torch.randint(0, vocab, (int(bad.sum()), slots), generator=gen)
    weights = torch.tensor(SUCCESSOR_WEIGHTS[:slots], dtype=torch.float)
    tokens = torch.empty(rows, seq + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (rows,), generator=gen)
    for pos in range(1, seq + 1):
        pick = torch.multinomial(weights, rows, replacement=True, generator=gen)
        tokens[:, pos] = succ[tokens[:, pos - 1], pick]
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def learning_rate(step, a):
    """The worker's schedule (optim::learning_rate) for 0-based `step`."""
    if step < a.lr_warmup:
        return a.lr * (step + 1) / a.lr_warmup
    span = max(a.steps - a.lr_warmup, 1)
    ratio = min((step - a.lr_warmup) / span, 1.0)
    return a.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (a.lr - a.min_lr)


def adamw_implementation(opt):
    g = opt.param_groups[0]
    if g.get("fused"):
        return "fused"
    if g.get("foreach"):
        return "foreach"
    # foreach=None: torch picks foreach only for CUDA tensors, so on CPU it is the for-loop.
    return "for-loop (foreach=None: the CPU default)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--ffn", type=int, required=True)
    ap.add_argument("--kv-heads", type=int, help="llama: KV heads [default: --heads]")
    ap.add_argument("--theta", type=float, default=10000.0, help="llama: rope theta")
    ap.add_argument("--norm-eps", type=float, default=1e-5, help="llama: RMSNorm eps")
    ap.add_argument("--global-batch", type=int, required=True)
    ap.add_argument("--micro-batch", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps in all")
    ap.add_argument("--warmup-steps", type=int, required=True, help="steps left out of the median")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--lr-warmup", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.global_batch % a.micro_batch:
        sys.exit(f"--global-batch {a.global_batch} is not a multiple of --micro-batch {a.micro_batch}")
    if a.steps <= a.warmup_steps:
        sys.exit(f"--steps {a.steps} leaves no measured step after --warmup-steps {a.warmup_steps}")
    if a.hidden % a.heads:
        sys.exit(f"--hidden {a.hidden} is not a multiple of --heads {a.heads}")
    if a.arch == "gpt2" and a.kv_heads is not None:
        sys.exit("--kv-heads is for --arch llama; GPT-2 has as many KV heads as heads")
    a.kv_heads = a.heads if a.kv_heads is None else a.kv_heads
    if a.kv_heads < 1 or a.heads % a.kv_heads:
        sys.exit(f"--heads {a.heads} is not a multiple of --kv-heads {a.kv_heads}")

    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)

    if a.arch == "llama":
        model = LlamaLoss(llama(a))
    else:
        model = GPT(a.layers, a.hidden, a.heads, a.ffn, a.vocab, a.seq)
    params = list(model.parameters())  # the tied embedding once
    decay = [p for p in params if p.dim() == 2]
    no_decay = [p for p in params if p.dim() != 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    micro = a.global_batch // a.micro_batch
    inputs, targets = markov_tokens(a.vocab, a.steps * a.global_batch, a.seq, gen)
    inputs = inputs.view(a.steps, micro, a.micro_batch, a.seq)
    targets = targets.view(a.steps, micro, a.micro_batch, a.seq)

    times, losses = [], []
    for step in range(a.steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, a)
        total = 0.0
        for m in range(micro):
            loss = model(inputs[step, m], targets[step, m])
            (loss / micro).backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        times.append(dt)
        losses.append(total / micro)
        print(f"  torch step {step + 1:>3}/{a.steps} | loss {losses[-1]:.4f} | grad norm "
              f"{float(norm):.4f} | {dt:.3f} s", file=sys.stderr, flush=True)

    tokens = a.global_batch * a.seq
    measured = times[a.warmup_steps:]
    res = {
        "side": "torch",
        "arch": a.arch,
        "tokens_per_step": tokens,
        "steps": a.steps,
        "warmup_steps": a.warmup_steps,
        "median_tokens_per_s": tokens / statistics.median(measured),
        "tokens_per_s": [tokens / t for t in measured],
        "step_s": times,
        "losses": losses,
        "params": sum(p.numel() for p in params),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "adamw": adamw_implementation(opt),
        "torch": torch.__version__,
        "attention": ("transformers LlamaForCausalLM, attn_implementation=sdpa" if a.arch == "llama"
                      else "F.scaled_dot_product_attention(is_causal=True)"),
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
    }
    if a.arch == "llama":
        import transformers

        res["transformers"] = transformers.__version__
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
