"""1 vs 2 ranks (gloo, localhost) for forward-gradient training steps, measured in one run.

FC 784-1024-1024-10, batch 64 (global), k = 16, weight perturbation with dense (``normal``) and
``lowrank`` tangents (every rank regenerates the tangents of the update: k x n numbers, or only the
factors), and activity perturbation (small tangents, the jvp passes dominate), one thread per rank in
both cases. Prints steps per second, the speedup of 2 ranks, and the bytes each rank sends per step
against the n * 4 bytes a data-parallel backprop all-reduce of float32 gradients would move, then a
final JSON line.

    python benchmarks/distributed.py [--steps 20] [--k 16] [--modes tangent data] [--perturbations weight activity]
                                     [--samplers normal lowrank]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import print_result
from torch import nn

import frog
from frog.distributed import Communicator


def make_model() -> nn.Sequential:
    """The FC net as an nn.Sequential of blocks (each Linear+ReLU, and the output layer)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(784, 1024), nn.ReLU()),
                         nn.Sequential(nn.Linear(1024, 1024), nn.ReLU()), nn.Linear(1024, 10))


def timed_steps(comm: Communicator | None, k: int, steps: int, perturbation: str, sampler: str = "normal"
                ) -> tuple[float, float]:
    """Seconds per step and bytes sent per step of fill_grad + SGD on one fixed global batch."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(64, 784, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))
    if comm is not None and comm.mode == "data":
        shard = comm.shard(64)
        comm.shard_weight = (shard.stop - shard.start) / 64
        x, y = x[shard], y[shard]
    estimator = frog.ForwardGradient(k, "project", engine="jvp", seed=0, communicator=comm, perturbation=perturbation,
                                     sampler=sampler)
    reduction = "none" if perturbation == "activity" else "mean"

    def step() -> None:
        estimator.fill_grad(model, lambda m: nn.functional.cross_entropy(m(x), y, reduction=reduction))
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


def _matmul_seconds(rank: int, out: str, tag: str) -> None:
    """Calibration: seconds of 40 single-thread 1024^2 matmuls in this process."""
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start = time.perf_counter()
    for _ in range(40):
        a @ b
    Path(out, f"{tag}-{rank}.json").write_text(json.dumps(time.perf_counter() - start))


def machine_parallel_speedup(tmp: str) -> float:
    """How much faster 2 processes finish 2 units of matmul work than 1 process finishes 1 unit, x2:
    2.0 on two independent cores; about 1.0 where the 2 CPUs share one core's throughput."""
    mp.start_processes(_matmul_seconds, args=(tmp, "one"), nprocs=1, join=True, start_method="spawn")
    mp.start_processes(_matmul_seconds, args=(tmp, "two"), nprocs=2, join=True, start_method="spawn")
    alone = json.loads(Path(tmp, "one-0.json").read_text())
    together = max(json.loads(Path(tmp, f"two-{r}.json").read_text()) for r in range(2))
    return 2 * alone / together


def _worker(rank: int, world: int, init_file: str, out: str, mode: str, k: int, steps: int, perturbation: str,
            sampler: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    seconds, sent = timed_steps(Communicator(mode), k, steps, perturbation, sampler)
    Path(out, f"{perturbation}-{sampler}-{mode}-{rank}.json").write_text(json.dumps({"seconds": seconds, "bytes": sent}))
    # A rank that tears its process group down while the other is still finishing the last all-gather
    # kills that rank: gloo's background thread meets the closed connection and calls std::terminate
    # ("terminate called without an active exception", SIGABRT). Wait for each other first.
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # the results are written: skip the interpreter's teardown of torch's threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--modes", nargs="+", default=["tangent", "data"])
    parser.add_argument("--perturbations", nargs="+", default=["weight", "activity"])
    parser.add_argument("--samplers", nargs="+", default=["normal", "lowrank"], help="tangents of weight perturbation")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = sum(p.numel() for p in make_model().parameters())
    rows: dict[str, tuple[float, float, float]] = {}  # name -> (seconds, bytes, speedup)
    with tempfile.TemporaryDirectory() as tmp:
        settings = [(p, s) for p in args.perturbations for s in (args.samplers if p == "weight" else ["normal"])]
        for perturbation, sampler in settings:
            name = perturbation if perturbation == "activity" else f"weight {sampler}"
            one_rank, _ = timed_steps(None, args.k, args.steps, perturbation, sampler)
            rows[f"{name}, 1 rank"] = (one_rank, 0.0, 1.0)
            for mode in args.modes:
                init = str(Path(tmp, f"init-{perturbation}-{sampler}-{mode}"))
                mp.start_processes(_worker, args=(2, init, tmp, mode, args.k, args.steps, perturbation, sampler),
                                   nprocs=2, join=True, start_method="spawn")
                results = [json.loads(Path(tmp, f"{perturbation}-{sampler}-{mode}-{r}.json").read_text())
                           for r in range(2)]
                seconds = max(r["seconds"] for r in results)
                rows[f"{name}, 2 ranks, {mode}"] = (seconds, max(r["bytes"] for r in results), one_rank / seconds)
        calibration = machine_parallel_speedup(tmp)
    print(f"FC 784-1024-1024-10 (n = {n}), global batch 64, k = {args.k}, 1 thread per rank")
    print(f"machine: 2 processes do {calibration:.2f}x the matmul work of 1 (the ceiling of any 2-rank speedup)")
    print(f"{'setting':<36}{'steps/s':>10}{'speedup':>10}{'bytes/step':>12}{'vs n*4':>12}")
    for name, (seconds, sent, speedup) in rows.items():
        print(f"{name:<36}{1 / seconds:>10.2f}{speedup:>10.2f}{sent:>12.0f}{sent / (4 * n):>12.2e}")
    print_result("distributed", k=args.k, n=n, backprop_allreduce_bytes=4 * n,
                 steps_per_second={name: round(1 / r[0], 3) for name, r in rows.items()},
                 speedup={name: round(r[2], 3) for name, r in rows.items()},
                 bytes_per_step={name: r[1] for name, r in rows.items()},
                 max_bytes_target=8 * args.k * 2, machine_parallel_speedup=round(calibration, 3))


if __name__ == "__main__":
    main()
