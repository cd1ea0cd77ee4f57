"""Peak memory of one training step (fill_grad + SGD step) per engine and for plain backprop.

Settings (each engine and backprop measured in a fresh process of this script):

- deep MLP: 32 Linear layers of width 1024 (input 1024, 10 classes), batch 256, k = 16,
  weight perturbation (dense and ``lowrank`` tangents of rank --rank) and activity perturbation
  (one block = Linear + ReLU);
- FC 784-1024-1024-10, batch 64, k = 64, weight perturbation (dense and ``lowrank``).

A measurement builds the model and the data, runs one forward pass and takes the resident set
size (RSS) as the baseline, runs a warm-up step, then one measured step; it reports the peak
over the baseline. On the CPU the peak is the kernel's high-water mark of the RSS (VmHWM, the
number getrusage's ru_maxrss reports), reset through /proc/self/clear_refs before the measured
step: ru_maxrss itself is useless in a child process, since Linux carries the parent's peak over
exec. With --device cuda: torch.cuda.max_memory_allocated after reset_peak_memory_stats.

Next to each setting the theoretical tangent memory: k x (largest block), what an engine needs
when the tangents are generated again where they are used, and k x n, what a step holds when all
tangents fit ForwardGradient's tangent budget (--tangent-budget-mb, default 512) and are kept.
Low-rank tangents are stored as their factors: a weight block takes r (m + n) numbers a tangent.
Beyond the budget the jvp engine runs its vectorized passes on chunks of rows that fit it.

    python benchmarks/memory.py [--k 16] [--fc-k 64] [--engines jvp loop sim fd] [--device cpu|cuda]
                                [--tangent-budget-mb MB] [--rank 1] [--settings ...]
"""

from __future__ import annotations

import argparse
import itertools

import torch
from _common import MB, measure_step, memory_in_use, print_result, reply, run_child
from torch import nn

import frog

SETTINGS = {  # name: (layer widths, batch, perturbation, which k option, tangent sampler)
    "deep-mlp weight": ([1024] * 32 + [10], 256, "weight", "k", "normal"),
    "deep-mlp weight lowrank": ([1024] * 32 + [10], 256, "weight", "k", "lowrank"),
    "deep-mlp activity": ([1024] * 32 + [10], 256, "activity", "k", "normal"),
    "fc weight": ([784, 1024, 1024, 10], 64, "weight", "fc_k", "normal"),
    "fc weight lowrank": ([784, 1024, 1024, 10], 64, "weight", "fc_k", "lowrank"),
}


def make_model(widths: list[int]) -> nn.Sequential:
    """An nn.Sequential of blocks Linear + ReLU (the last block: Linear alone)."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(i, o), nn.ReLU()) for i, o in itertools.pairwise(widths[:-1])]
    return nn.Sequential(*blocks, nn.Sequential(nn.Linear(widths[-2], widths[-1])))


def block_sizes(widths: list[int], perturbation: str, sampler: str = "normal", rank: int = 1) -> list[int]:
    """Entries of each tangent block as stored: parameter tensors (low-rank weights: their factors,
    r (m + n)), or block outputs (shared by the batch)."""
    if perturbation == "activity":
        return widths[1:]
    weight = (lambda i, o: rank * (i + o)) if sampler == "lowrank" else (lambda i, o: i * o)
    return [size for i, o in itertools.pairwise(widths) for size in (weight(i, o), o)]  # weight, bias


def measure(setting: str, method: str, k: int, device: str, budget_mb: float, rank: int) -> dict[str, float]:
    """Runs in the child process: peak memory of one step over the baseline, in MB."""
    widths, batch, perturbation, _, sampler = SETTINGS[setting]
    model = make_model(widths).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, widths[0], device=device)
    y = torch.randint(0, widths[-1], (batch,), device=device)
    reduction = "none" if perturbation == "activity" and method != "backprop" else "mean"

    def loss_fn(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(x), y, reduction=reduction)

    estimator = frog.ForwardGradient(k, "project", engine=method if method != "backprop" else "jvp",
                                     seed=0, perturbation=perturbation, tangent_budget_mb=budget_mb,
                                     sampler=sampler, rank=rank if sampler == "lowrank" else 1)

    def step() -> None:
        if method == "backprop":
            optimizer.zero_grad()
            loss_fn(model).backward()
        else:
            estimator.fill_grad(model, loss_fn)
        optimizer.step()

    with torch.no_grad():
        loss_fn(model)  # warm-up forward pass
    baseline = memory_in_use(device)
    step()  # warm-up
    _, _, peak = measure_step(step, device)
    return {"baseline_mb": baseline / MB, "peak_mb": (peak - baseline) / MB}


def measure_in_child(setting: str, method: str, k: int, device: str, default_malloc: bool, budget_mb: float,
                     rank: int) -> dict[str, float]:
    """``measure`` in a fresh process of this script."""
    return run_child(__file__, ["--child", setting, method, str(k), "--device", device,
                                "--tangent-budget-mb", str(budget_mb), "--rank", str(rank)],
                     fixed_mmap_threshold=not default_malloc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=16, help="k of the deep MLP")
    parser.add_argument("--fc-k", type=int, default=64, help="k of the FC net")
    parser.add_argument("--engines", nargs="+", default=["jvp", "loop", "sim", "fd"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tangent-budget-mb", type=float, default=frog.engines.DEFAULT_TANGENT_BUDGET_MB,
                        help="ForwardGradient's tangent budget: tangents that fit it are kept for the step")
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's dynamic mmap threshold")
    parser.add_argument("--rank", type=int, default=1, help="rank of the lowrank settings")
    parser.add_argument("--child", nargs=3, metavar=("SETTING", "METHOD", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        setting, method, k = args.child
        reply(measure(setting, method, int(k), args.device, args.tangent_budget_mb, args.rank))
        return

    results = {}
    for setting in args.settings:
        widths, batch, perturbation, k_option, sampler = SETTINGS[setting]
        k = getattr(args, k_option)
        sizes = block_sizes(widths, perturbation, sampler, args.rank)
        theory = {"k_x_largest_block_mb": k * max(sizes) * 4 / MB, "k_x_n_mb": k * sum(sizes) * 4 / MB}
        gradient_mb = sum(block_sizes(widths, "weight")) * 4 / MB
        peaks = {method: measure_in_child(setting, method, k, args.device, args.default_malloc,
                                          args.tangent_budget_mb, args.rank)["peak_mb"]
                 for method in ["backprop", *args.engines]}
        print(f"\n{setting}: {len(widths) - 1} Linear layers of width {widths[1]}, batch {batch}, k = {k}, "
              f"{sum(sizes):,} stored tangent entries ({sampler}), device {args.device}, "
              f"tangent budget {args.tangent_budget_mb:g} MB")
        print(f"theory: k x (largest block) = {theory['k_x_largest_block_mb']:.1f} MB, "
              f"k x n = {theory['k_x_n_mb']:.1f} MB; one gradient (all parameters) = {gradient_mb:.1f} MB")
        print(f"{'method':<10}{'peak MB':>10}{'x backprop':>12}{'over backprop MB':>18}")
        for method, peak in peaks.items():
            print(f"{method:<10}{peak:>10.1f}{peak / peaks['backprop']:>12.2f}{peak - peaks['backprop']:>18.1f}")
        results[setting] = {"k": k, **{n: round(v, 2) for n, v in theory.items()}, "gradient_mb": round(gradient_mb, 2),
                            "peak_mb": {m: round(p, 1) for m, p in peaks.items()},
                            "ratio_to_backprop": {m: round(p / peaks["backprop"], 2) for m, p in peaks.items()}}
    print_result("memory", device=args.device, tangent_budget_mb=args.tangent_budget_mb, results=results)


if __name__ == "__main__":
    main()
