"""How far apart BatchNorm puts the sim and jvp activity-perturbed estimates of ResNet18.

With BatchNorm in train mode (batch statistics) every per-sample loss l_i depends on every
sample's block activity h_j. Activity perturbation adds one tangent v per block, shared by the
batch; the ``jvp`` engine then gets d_i = <sum_j dl_i/dh_j, v> (forward mode along the shared
tangent), the ``sim`` engine (the paper's simulation) d_i = <d(sum_j l_j)/dh_i, v>: equal in sum
over i, not per sample, so the two estimates differ (without batch statistics they are the same:
tests/test_train.py). This measures, for ResNet18 (frog.training.models) at initialization in train mode on
Fashion-MNIST training batches, the cosine between the two estimates (frog, k tangents, plain
projection as ``frog train``; batch p of a fixed order with tangents from seed p, the same for both
engines) and each one's cosine to the backprop gradient of the batch's mean loss. Prints one line
per batch, the means with 95% confidence half-widths and a final JSON line.

    python benchmarks/studies/batchnorm.py [--batches 10] [--batch-size 64] [-k 16] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common

from _common import print_result

import frog
from frog.quality import cosine_similarity, mean_and_ci
from frog.training.data import batches, load_dataset
from frog.training.models import make_model

ENGINES = ("sim", "jvp")


def flat_grad(model: nn.Module) -> torch.Tensor:
    """Every parameter's .grad, concatenated (n,) in float64."""
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def backprop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient (n,) of the batch's mean cross-entropy."""
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return flat_grad(model)


def estimate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, engine: str, k: int, seed: int) -> torch.Tensor:
    """frog's activity-perturbed estimate (n,) as ``frog train`` computes it (no length correction)."""
    fg = frog.ForwardGradient(k, "project", engine=engine, seed=seed, perturbation="activity", scale_correction=False)
    fg.fill_grad(model, lambda m: nn.functional.cross_entropy(m(x), y, reduction="none"))
    return flat_grad(model)


def cosines(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, seed: int) -> dict[str, float]:
    """cos(sim, jvp) and each estimate's cosine to backprop on one batch."""
    true = backprop(model, x, y)
    sim, jvp = (estimate(model, x, y, engine, k, seed) for engine in ENGINES)
    return {"sim_jvp": float(cosine_similarity(sim, jvp)), "sim_bp": float(cosine_similarity(sim, true)),
            "jvp_bp": float(cosine_similarity(jvp, true))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("-k", "--tangents", type=int, default=16)
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", args.data_dir, split_seed=0)
    torch.manual_seed(0)
    model = make_model("resnet18", data.input_shape, data.num_classes).train()
    order = torch.Generator().manual_seed(0)
    pairs = zip(range(args.batches), batches(data.train, args.batch_size, shuffle=True, generator=order),
                strict=False)
    print(f"ResNet18, train mode, Fashion-MNIST batches of {args.batch_size}, frog k = {args.tangents}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'cos(sim, jvp)':>14} {'cos(sim, bp)':>13} {'cos(jvp, bp)':>13} {'s':>6}", flush=True)
    rows = []
    for seed, (x, y) in pairs:
        start = time.perf_counter()
        rows.append(cosines(model, x, y, args.tangents, seed))
        print(f"{seed:>5} {rows[-1]['sim_jvp']:>14.4f} {rows[-1]['sim_bp']:>13.4f} {rows[-1]['jvp_bp']:>13.4f} "
              f"{time.perf_counter() - start:>6.1f}", flush=True)
    summary = {name: mean_and_ci(torch.tensor([r[name] for r in rows], dtype=torch.float64)) for name in rows[0]}
    print("mean " + ", ".join(f"cos({name.replace('_', ', ')}) {m:.4f} ± {ci:.4f}" for name, (m, ci) in summary.items()))
    print_result("batchnorm", model="resnet18", batch_size=args.batch_size, k=args.tangents, batches=len(rows),
                 results={name: {"mean": round(m, 4), "ci": round(ci, 4)} for name, (m, ci) in summary.items()})


if __name__ == "__main__":
    main()
