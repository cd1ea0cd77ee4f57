"""How well forward-gradient estimates align with the true gradient of a network (Fig. 3 for networks).

FC networks (784-W-W-10, W in {256, 1024}) on Fashion-MNIST training batches of 64: the cosine
similarity and norm ratio of frog's estimate (k tangents, the projection) to the autograd gradient
of the same batch, for

- ``normal``: dense N(0, 1) weight tangents (weight perturbation);
- ``lowrank-1``, ``lowrank-4``: low-rank weight tangents U V^T / sqrt(r), r = 1, 4;
- ``input-span``: rank 1, right factors in the span of each layer's inputs in the batch;
- ``activity``: the paper's activity perturbation (a tangent per block output, shared by the batch).

Each value is the mean over P batch/seed pairs (batch p of a fixed order, tangents from seed p) with
its 95% confidence half-width 1.96 std / sqrt(P), at the network's initialization ("init") and
after one epoch of backprop (plain SGD at the paper's step size). The estimates come from the
``sim`` engine, which gives the same numbers as ``jvp`` (tests). Rows are appended to
``OUT/alignment.csv`` as they come; a rerun skips the rows already there.

    python benchmarks/studies/alignment.py [--widths 256 1024] [--ks 1 4 16 64] [--pairs 50] [--out runs/alignment]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import frog
from frog.quality import cosine_similarity, mean_and_ci, norm_ratio
from frog.training.data import batches, load_dataset
from frog.training.lrs import network_lr
from frog.training.models import make_model
from frog.training.results import CsvLog

METHODS = {  # name: ForwardGradient options
    "normal": {"sampler": "normal"},
    "lowrank-1": {"sampler": "lowrank", "rank": 1},
    "lowrank-4": {"sampler": "lowrank", "rank": 4},
    "input-span": {"sampler": "input-span", "rank": 1},
    "activity": {"perturbation": "activity"},
}
COLUMNS = ["width", "state", "method", "k", "pairs", "cosine_mean", "cosine_ci", "norm_ratio_mean", "norm_ratio_ci",
           "seconds"]


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def true_gradients(model: nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """The autograd gradient of the mean cross-entropy of each batch, flattened (n,)."""
    out = []
    for x, y in pairs:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        out.append(flat_grad(model).clone())
    model.zero_grad()
    return out


def alignment(model: nn.Module, pairs, grads, method: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and norm ratio (P,) of frog's estimate over the batch/seed pairs."""
    options = METHODS[method]
    activity = options.get("perturbation") == "activity"
    reduction = "none" if activity else "mean"
    estimates = []
    for seed, (x, y) in enumerate(pairs):
        fg = frog.ForwardGradient(k, "project", engine="sim", seed=seed, **options)
        fg.fill_grad(model, lambda m, x=x, y=y: nn.functional.cross_entropy(m(x), y, reduction=reduction))
        estimates.append(flat_grad(model).clone())
    model.zero_grad()
    stacked, truth = torch.stack(estimates).double(), torch.stack(grads).double()
    cosine = torch.stack([cosine_similarity(e, g) for e, g in zip(stacked, truth, strict=True)])
    ratio = torch.stack([norm_ratio(e, g) for e, g in zip(stacked, truth, strict=True)])
    return cosine, ratio


def train_one_epoch(model: nn.Module, data, width: int) -> None:
    """One epoch of backprop, plain SGD at the paper's step size for the FC net (MNIST row), batch 64."""
    lr, _ = network_lr("fc", width, "fashion-mnist", "bp", 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(1)
    for x, y in batches(data.train, 64, shuffle=True, generator=generator):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--pairs", type=int, default=50, help="batch/seed pairs per value")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    parser.add_argument("--out", default="runs/alignment")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = CsvLog(out / "alignment.csv", COLUMNS)
    done = log.done(["width", "state", "method", "k"])
    data = load_dataset("fashion-mnist", args.data_dir, split_seed=0)
    order = torch.Generator().manual_seed(0)
    pairs = [batch for batch, _ in zip(batches(data.train, 64, shuffle=True, generator=order), range(args.pairs),
                                       strict=False)]
    print(f"{'width':>6} {'state':>6} {'method':>11} {'k':>3} {'cosine':>17} {'norm ratio':>17} {'s':>6}", flush=True)
    for width in args.widths:
        torch.manual_seed(0)
        model = make_model("fc", data.input_shape, data.num_classes, width=width)
        for state in ("init", "epoch1"):
            if state == "epoch1":
                train_one_epoch(model, data, width)
            grads = true_gradients(model, pairs)
            for method in args.methods:
                for k in args.ks:
                    if (str(width), state, method, str(k)) in done:
                        continue
                    start = time.perf_counter()
                    cosine, ratio = alignment(model, pairs, grads, method, k)
                    (c, c_ci), (r, r_ci) = mean_and_ci(cosine), mean_and_ci(ratio)
                    seconds = time.perf_counter() - start
                    log.append({"width": width, "state": state, "method": method, "k": k, "pairs": len(pairs),
                                "cosine_mean": c, "cosine_ci": c_ci, "norm_ratio_mean": r, "norm_ratio_ci": r_ci,
                                "seconds": seconds})
                    print(f"{width:>6} {state:>6} {method:>11} {k:>3} {c:>9.4f} ± {c_ci:.4f} {r:>9.4f} ± {r_ci:.4f} "
                          f"{seconds:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
