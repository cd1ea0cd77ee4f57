"""1 vs 2 ranks (gloo, localhost) for forward-gradient training steps, measured in one run.

FC 784-1024-1024-10, batch 64 (global), k = 16, weight perturbation, one thread per rank in both
cases. Prints steps per second, the speedup of 2 ranks, and the bytes each rank sends per step
against the n * 4 bytes a data-parallel backprop all-reduce of float32 gradients would move, then a
final JSON line.

    python benchmarks/distributed.py [--steps 20] [--k 16] [--modes tangent data]
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import frog
from frog.distributed import Communicator


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def timed_steps(comm: Communicator | None, k: int, steps: int) -> tuple[float, float]:
    """Seconds per step and bytes sent per step of fill_grad + SGD on one fixed global batch."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(64, 784, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))
    if comm is not None and comm.mode == "data":
        shard = comm.shard(64)
        comm.shard_weight = (shard.stop - shard.start) / 64
        x, y = x[shard], y[shard]
    estimator = frog.ForwardGradient(k, "project", engine="jvp", seed=0, communicator=comm)

    def step() -> None:
        estimator.fill_grad(model, lambda m: nn.functional.cross_entropy(m(x), y))
        optimizer.step()

    step()  # warm-up
    sent = comm.bytes_sent if comm else 0
    if comm:
        comm.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return seconds, ((comm.bytes_sent - sent) / steps if comm else 0.0)


def _worker(rank: int, world: int, init_file: str, out: str, mode: str, k: int, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    seconds, sent = timed_steps(Communicator(mode), k, steps)
    Path(out, f"{mode}-{rank}.json").write_text(json.dumps({"seconds": seconds, "bytes": sent}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--modes", nargs="+", default=["tangent", "data"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = sum(p.numel() for p in make_model().parameters())
    one_rank, _ = timed_steps(None, args.k, args.steps)
    rows = {"1 rank": (one_rank, 0.0)}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            mp.start_processes(_worker, args=(2, str(Path(tmp, f"init-{mode}")), tmp, mode, args.k, args.steps),
                               nprocs=2, join=True, start_method="spawn")
            results = [json.loads(Path(tmp, f"{mode}-{r}.json").read_text()) for r in range(2)]
            rows[f"2 ranks, {mode}"] = (max(r["seconds"] for r in results), max(r["bytes"] for r in results))
    print(f"FC 784-1024-1024-10 (n = {n}), global batch 64, k = {args.k}, weight perturbation, 1 thread per rank")
    print(f"{'setting':<20}{'steps/s':>10}{'speedup':>10}{'bytes/step':>12}{'vs n*4':>12}")
    for name, (seconds, sent) in rows.items():
        print(f"{name:<20}{1 / seconds:>10.2f}{one_rank / seconds:>10.2f}{sent:>12.0f}{sent / (4 * n):>12.2e}")
    print(json.dumps({"benchmark": "distributed", "k": args.k, "n": n, "backprop_allreduce_bytes": 4 * n,
                      "steps_per_second": {name: round(1 / s, 3) for name, (s, _) in rows.items()},
                      "speedup": {name: round(one_rank / s, 3) for name, (s, _) in rows.items()},
                      "bytes_per_step": {name: b for name, (_, b) in rows.items()},
                      "max_bytes_target": 8 * args.k * 2}))


if __name__ == "__main__":
    main()
