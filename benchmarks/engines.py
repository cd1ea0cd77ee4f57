"""Time one training step (fill_grad + SGD step) per engine, side by side in one run.

Model: MLP 784-1024-1024-10 (ReLU), batch 64, weight perturbation, k tangents (default 16).
Prints each engine's median step time, the ratios jvp/loop and jvp/backprop, the achieved GFLOP/s
of the jvp engine against a plain matmul measured in the same run, and a final JSON line.

    python benchmarks/engines.py [--k 16] [--repeats 5] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import frog

LAYERS = [(784, 1024), (1024, 1024), (1024, 10)]


def make_model(device: str) -> nn.Module:
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(LAYERS):
        blocks.append(nn.Linear(fan_in, fan_out))
        if i < len(LAYERS) - 1:
            blocks.append(nn.ReLU())
    return nn.Sequential(*blocks).to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(step, repeats: int, device: str) -> float:
    step()  # warm-up (vmap/jvp tracing, allocator)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jvp_flops(batch: int, k: int) -> float:
    """Primal once, plus per tangent and layer two matmuls (W_t x and W x_t), one for the first."""
    primal = sum(2 * batch * i * o for i, o in LAYERS)
    per_tangent = sum((1 if layer == 0 else 2) * 2 * batch * i * o for layer, (i, o) in enumerate(LAYERS))
    return primal + k * per_tangent


def matmul_gflops(device: str, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    seconds = median_time(lambda: a @ b, repeats, device)
    return 2 * size**3 / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    model = make_model(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, 784, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def loss_fn(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(x), y)

    def backprop_step() -> None:
        optimizer.zero_grad()
        loss_fn(model).backward()
        optimizer.step()

    def engine_step(engine: str):
        estimator = frog.ForwardGradient(args.k, "project", engine=engine, seed=0)

        def step() -> None:
            estimator.fill_grad(model, loss_fn)
            optimizer.step()

        return step

    params = [p.detach() for p in model.parameters()]
    generator_only = frog.ForwardGradient(args.k, "project", seed=0)  # keeps its tangent buffers, as in a step

    def tangents_and_gram() -> None:
        plan = generator_only.plan([p.shape for p in params], params[0])
        plan.gram()  # generates every block (into the reused buffers) and sums their Gram matrices

    times = {"backprop": median_time(backprop_step, args.repeats, device)}
    for engine in ("jvp", "loop", "sim"):
        times[engine] = median_time(engine_step(engine), args.repeats, device)
    times["tangents+gram"] = median_time(tangents_and_gram, args.repeats, device)
    peak = matmul_gflops(device)
    achieved = jvp_flops(args.batch, args.k) / times["jvp"] / 1e9

    print(f"MLP 784-1024-1024-10, batch {args.batch}, k = {args.k}, weight perturbation, "
          f"device {device}, threads {torch.get_num_threads()}")
    print(f"{'step':<16}{'ms':>10}{'x backprop':>12}")
    for name, seconds in times.items():
        print(f"{name:<16}{seconds * 1e3:>10.1f}{seconds / times['backprop']:>12.2f}")
    ratios = {
        "loop_over_jvp": times["loop"] / times["jvp"],
        "jvp_over_backprop": times["jvp"] / times["backprop"],
        "sim_over_backprop": times["sim"] / times["backprop"],
        "tangents_gram_share_of_jvp": times["tangents+gram"] / times["jvp"],
        "jvp_gflops": achieved,
        "matmul_gflops": peak,
        "jvp_share_of_matmul": achieved / peak,
    }
    print(f"jvp is {ratios['loop_over_jvp']:.2f}x faster than loop; jvp/backprop = {ratios['jvp_over_backprop']:.2f}")
    print(f"jvp engine: {achieved:.1f} GFLOP/s vs plain matmul {peak:.1f} GFLOP/s ({100 * ratios['jvp_share_of_matmul']:.0f}%)")
    print(json.dumps({"benchmark": "engines", "k": args.k, "device": device,
                      "ms": {n: round(s * 1e3, 2) for n, s in times.items()},
                      "ratios": {n: round(v, 3) for n, v in ratios.items()}}))


if __name__ == "__main__":
    main()
