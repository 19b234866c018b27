"""Benchmark: the cost of myriad.checkpoint for GPT-2 124M's training state (model + AdamW
moments) against one training step of the same model, and the restore time.

    python3 bench/pytorch_checkpoint.py [--repeats 3] [--batch 8] [--seq 256] [--dir /dev/shm/...]

Prints medians of --repeats runs: the training step, the hand-off (what `save` costs the training
thread: copying every tensor), the background write (SHA-256 and files on the memory tier), and
`load` (read, verify, rebuild); beside them, in the same run, the peer a script would otherwise
use: a synchronous `torch.save` of the same state into the same directory, and `torch.load`.
Needs PyTorch; runs on the CPU."""

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import myriad  # noqa: E402
from myriad import checkpoint  # noqa: E402


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    """GPT-2 small: 12 layers, width 768, 12 heads, 50,257 tokens, 1,024 positions, tied head."""

    def __init__(self, vocab=50257, ctx=1024, d=768, layers=12, heads=12):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dir", help="memory tier to write to (default: a new directory on /dev/shm)")
    a = p.parse_args()
    root = a.dir or tempfile.mkdtemp(prefix="myriad-ckpt-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.environ.update({"MYRIAD_MEMORY_CHECKPOINT_DIR": root, "RANK": "0", "MYRIAD_JOB_ID": "1"})
    torch.manual_seed(0)
    model = GPT2()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    idx = torch.randint(0, 50257, (a.batch, a.seq + 1))
    steps, handoffs, writes, loads, saves, torch_loads = [], [], [], [], [], []
    try:
        for i in range(a.repeats + 1):
            t0 = time.perf_counter()
            logits = model(idx[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t1 = time.perf_counter()
            checkpoint.save(i + 1, {"model": model.state_dict(), "optimizer": opt.state_dict()})
            t2 = time.perf_counter()
            checkpoint.wait()
            t3 = time.perf_counter()
            os.environ["MYRIAD_RESTORE_DIR"] = os.path.join(root, f"step_{i + 1:08d}")
            os.environ["MYRIAD_RESTORE_STEP"] = str(i + 1)
            restored = checkpoint.load()
            t4 = time.perf_counter()
            assert restored.step == i + 1
            del restored
            peer = os.path.join(root, "torch-save.pt")
            t5 = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, peer)
            t6 = time.perf_counter()
            torch.load(peer, weights_only=True)
            t7 = time.perf_counter()
            os.remove(peer)
            if i == 0:
                continue  # the first step warms allocators and caches
            steps.append(t1 - t0)
            handoffs.append(t2 - t1)
            writes.append(t3 - t2)
            loads.append(t4 - t3)
            saves.append(t6 - t5)
            torch_loads.append(t7 - t6)
        state_bytes = sum(
            os.path.getsize(os.path.join(root, f"step_{a.repeats + 1:08d}", n))
            for n in os.listdir(os.path.join(root, f"step_{a.repeats + 1:08d}"))
        )
    finally:
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    out = {
        "parameters": params,
        "checkpoint_bytes": state_bytes,
        "batch": a.batch,
        "seq": a.seq,
        "repeats": a.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "step_s": med(steps),
        "handoff_s": med(handoffs),
        "handoff_share_of_step": med(handoffs) / med(steps),
        "background_write_s": med(writes),
        "write_gb_per_s": state_bytes / med(writes) / 1e9,
        "load_s": med(loads),
        "torch_save_s": med(saves),
        "handoff_vs_torch_save": med(handoffs) / med(saves),
        "torch_load_s": med(torch_loads),
        "load_vs_torch_load": med(loads) / med(torch_loads),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
