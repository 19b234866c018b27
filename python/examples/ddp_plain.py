"""A data-parallel PyTorch script as a user writes it: torchrun's environment, gloo (or NCCL on
GPUs), DistributedDataParallel, and no import of Myriad. Under `myriad run` or `myriad submit`
every optimizer step still reaches the agent (its sitecustomize hooks `optimizer.step()`), so a
hung rank is found in seconds and the job's step shows in `myriad status` and /metrics.

    myriad run --nnodes 2 --nproc-per-node 2 ddp_plain.py --steps 200
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--step-ms", type=float, default=0.0, help="extra time per step (stands in for a bigger model)")
    a = p.parse_args()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 32)).to(device))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(a.steps):
        g = torch.Generator().manual_seed(step * world + rank)
        x = torch.randn(16, 32, generator=g).to(device)
        loss = ((model(x) - x.flip(1)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        if a.step_ms:
            time.sleep(a.step_ms / 1e3)
        opt.step()
        if rank == 0 and step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    if rank == 0:
        print("done", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
