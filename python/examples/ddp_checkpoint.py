"""A data-parallel PyTorch script with Myriad's two-line checkpoints: every step's state goes to
the node's memory tier (`myriad.checkpoint.save`), a restarted attempt resumes from the step the
controller chose (`myriad.checkpoint.load`), and `myriad.report` adds loss, tokens/s and MFU. The
data of each step depends only on the step, so a run that recovers from faults ends with the same
weights, bit for bit, as one that never failed.

    myriad submit --nnodes 2 --nproc-per-node 2 --max-restarts 5 -- python3 ddp_checkpoint.py --out w.json
"""

import argparse
import hashlib
import json
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import myriad

WIDTH, BATCH = 64, 16


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--step-ms", type=float, default=0.0, help="extra time per step (stands in for a bigger model)")
    p.add_argument("--out", help="rank 0 writes the final weights' SHA-256 here")
    a = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(WIDTH, 4 * WIDTH), torch.nn.GELU(), torch.nn.Linear(4 * WIDTH, WIDTH))
    model = DDP(net, find_unused_parameters=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params = sum(p.numel() for p in net.parameters())
    start = 0
    restored = myriad.checkpoint.load()
    if restored is not None:
        net.load_state_dict(restored.state["model"])
        opt.load_state_dict(restored.state["optimizer"])
        start = restored.step
        if rank == 0:
            print(f"resumed at step {start}", flush=True)
    for step in range(start, a.steps):
        g = torch.Generator().manual_seed(step * world + rank)
        x = torch.randn(BATCH, WIDTH, generator=g)
        loss = ((model(x) - x.roll(1, dims=1)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        if a.step_ms:
            time.sleep(a.step_ms / 1e3)
        opt.step()
        myriad.checkpoint.save(step + 1, {"model": net.state_dict(), "optimizer": opt.state_dict()})
        myriad.report(step=step + 1, loss=loss.item(), tokens=BATCH * world, flops_per_token=6 * params)
        if rank == 0:
            print(f"step {step + 1} loss {loss.item():.9e}", flush=True)
    myriad.checkpoint.wait()
    if rank == 0:
        digest = hashlib.sha256()
        for name, t in sorted(net.state_dict().items()):
            digest.update(name.encode())
            digest.update(bytes(t.detach().contiguous().view(-1).view(torch.uint8).tolist()))
        text = json.dumps({"steps": a.steps, "weights_sha256": digest.hexdigest()})
        print(text, flush=True)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
