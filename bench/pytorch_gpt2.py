#!/usr/bin/env python3
"""PyTorch CPU baseline for Myriad's GPT-2 trainer.

Trains the same GPT-2-style model as `myriad train` (nanoGPT layout, FP32,
no dropout, tied LM head) with the same training step (zero_grad, forward,
cross-entropy, backward, clip_grad_norm_(1.0), AdamW) on the CPU, and reports
throughput and MFU under the project's definition (see README.md):

    model FLOPs per token = 6 * (params - position-embedding params) + 12 * L * C * T

where params counts the tied embedding once (the padded vocab matrix in full)
and all biases and LayerNorm parameters.

Needs `pip install torch numpy`. Example:

    python3 bench/pytorch_gpt2.py --preset gpt2-124m --batch 8 --seq 256 --steps 5 --json

Pass `--peak-gflops G` (e.g. from `myriad bench peak`) to get MFU, and
`--sdpa` to use F.scaled_dot_product_attention instead of the explicit
matmul + mask + softmax attention that Myriad implements. Progress goes to
stderr; with --json stdout holds exactly one JSON object.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    sys.stderr.write(
        "error: PyTorch is not installed; install it with `pip install torch numpy`\n"
    )
    sys.exit(2)


PRESETS = {
    # name: (vocab, padded vocab, ctx, layers, heads, width)
    "tiny": (256, 256, 256, 5, 4, 128),
    "small": (256, 256, 512, 6, 6, 384),
    "gpt2-124m": (50257, 50304, 1024, 12, 12, 768),
}


class Attention(nn.Module):
    def __init__(self, c, heads, ctx, sdpa):
        super().__init__()
        self.heads = heads
        self.sdpa = sdpa
        self.c_attn = nn.Linear(c, 3 * c, bias=True)
        self.c_proj = nn.Linear(c, c, bias=True)
        mask = torch.tril(torch.ones(ctx, ctx, dtype=torch.bool))
        self.register_buffer("mask", mask.view(1, 1, ctx, ctx), persistent=False)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        hs = c // self.heads
        q = q.view(b, t, self.heads, hs).transpose(1, 2)
        k = k.view(b, t, self.heads, hs).transpose(1, 2)
        v = v.view(b, t, self.heads, hs).transpose(1, 2)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
            att = att.masked_fill(~self.mask[:, :, :t, :t], float("-inf"))
            att = F.softmax(att, dim=-1)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


class Mlp(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_fc = nn.Linear(c, 4 * c, bias=True)
        self.c_proj = nn.Linear(4 * c, c, bias=True)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, c, heads, ctx, sdpa):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c, eps=1e-5, bias=True)
        self.attn = Attention(c, heads, ctx, sdpa)
        self.ln_2 = nn.LayerNorm(c, eps=1e-5, bias=True)
        self.mlp = Mlp(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class Gpt(nn.Module):
    def __init__(self, vocab, padded_vocab, ctx, layers, heads, c, sdpa):
        super().__init__()
        self.vocab = vocab
        self.wte = nn.Embedding(padded_vocab, c)
        self.wpe = nn.Embedding(ctx, c)
        self.h = nn.ModuleList(Block(c, heads, ctx, sdpa) for _ in range(layers))
        self.ln_f = nn.LayerNorm(c, eps=1e-5, bias=True)
        self.lm_head = nn.Linear(c, padded_vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init)
        resid_std = 0.02 / math.sqrt(2 * layers)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=resid_std)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, idx, targets):
        _, t = idx.shape
        pos = torch.arange(t, dtype=torch.long)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        logits = logits[..., : self.vocab]  # loss over the real vocab only
        return F.cross_entropy(logits.reshape(-1, self.vocab), targets.reshape(-1))


ADAMW_KINDS = {"fused": {"fused": True}, "foreach": {"foreach": True},
               "for-loop": {"foreach": False}}


def make_optimizer(model, kind):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": 0.1},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8,
                             **ADAMW_KINDS[kind])


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpt2-124m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--peak-gflops", type=float, default=None)
    ap.add_argument("--sdpa", action="store_true",
                    help="use F.scaled_dot_product_attention(is_causal=True)")
    # AdamW implementation. fused=True (CPU kernel since torch 2.4) was the
    # fastest here, ahead of foreach and the per-parameter for-loop.
    ap.add_argument("--adamw", choices=sorted(ADAMW_KINDS), default="fused",
                    help="AdamW implementation (default: fused, the fastest on CPU here)")
    ap.add_argument("--json", action="store_true")
    return ap.parse_args()


def main():
    args = parse_args()
    vocab, padded, ctx, layers, heads, c = PRESETS[args.preset]
    if args.seq > ctx:
        sys.exit(f"error: --seq {args.seq} exceeds the preset's context {ctx}")
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.seq < 1:
        sys.exit("error: --steps and --batch and --seq must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = Gpt(vocab, padded, ctx, layers, heads, c, args.sdpa)
    model.train()
    params = sum(p.numel() for p in model.parameters())  # tied weight counted once
    flops_per_token = 6 * (params - model.wpe.weight.numel()) + 12 * layers * c * args.seq
    opt = make_optimizer(model, args.adamw)

    x = torch.randint(0, vocab, (args.batch, args.seq), dtype=torch.long)
    y = torch.randint(0, vocab, (args.batch, args.seq), dtype=torch.long)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"preset {args.preset}, params {params}, flops/token {flops_per_token}, "
          f"attention {'sdpa' if args.sdpa else 'matmul'}, AdamW {args.adamw}",
          file=sys.stderr, flush=True)

    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = loss.item()
        dt = time.perf_counter() - t0
        warm = step < args.warmup
        if not warm:
            times.append(dt)
        print(f"step {step + 1}/{args.warmup + args.steps}{' (warm-up)' if warm else ''}: "
              f"loss {lv:.4f}, grad norm {float(norm):.3f}, {dt * 1e3:.1f} ms, "
              f"{args.batch * args.seq / dt:.0f} tok/s",
              file=sys.stderr, flush=True)

    step_s = statistics.median(times)
    tokens_per_s = args.batch * args.seq / step_s
    model_gflops = tokens_per_s * flops_per_token / 1e9
    mfu = model_gflops / args.peak_gflops if args.peak_gflops else None
    result = {
        "tokens_per_s": tokens_per_s,
        "model_gflops": model_gflops,
        "peak_gflops": args.peak_gflops,
        "mfu": mfu,
        "step_ms_median": step_s * 1e3,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "preset": args.preset,
        "batch": args.batch,
        "seq": args.seq,
        "flops_per_token": flops_per_token,
        "params": params,
        "attention": "sdpa" if args.sdpa else "matmul",
        "adamw": args.adamw,
    }
    if args.json:
        print(json.dumps(result))
    else:
        mfu_s = f", MFU {mfu * 100:.1f}%" if mfu is not None else ""
        print(f"{args.preset} B={args.batch} T={args.seq} ({result['attention']} attention, "
              f"AdamW {args.adamw}, {result['threads']} threads, torch {torch.__version__}): "
              f"median step {step_s * 1e3:.1f} ms, {tokens_per_s:.0f} tok/s, "
              f"{model_gflops:.1f} model GFLOP/s{mfu_s}")


if __name__ == "__main__":
    main()
