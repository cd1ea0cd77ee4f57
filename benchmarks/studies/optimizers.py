"""Which torch.optim optimizers learn with frog, with and without the length correction.

The classic MNIST CNN of examples/fashion_cnn.py on Fashion-MNIST, batch 64, frog with k = 16 and
the sim engine (the same estimates as jvp, faster on a CPU); every optimizer at its usual settings
(SGD lr 0.1, Adam and AdamW lr 1e-3, Adadelta lr 1.0, Adagrad lr 0.01, RMSprop lr 0.01 and 1e-3),
once with the paper's plain projection (scale_correction=False) and once with the default length
correction. Prints the test loss / accuracy (first 1000 test images) after the steps, and a line of JSON.
First, why: the length of the estimate relative to the gradient, per parameter tensor and in
total, on one batch of 64 (model in eval mode, mean over 5 draws), for both perturbations, plain
and corrected.

    python benchmarks/studies/optimizers.py [--steps 150] [--perturbations activity weight] [--optimizers sgd adadelta]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common

from _common import load_example, print_result

import frog
from frog.training.data import Split, batches, load_dataset

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
    "rmsprop-1e-3": lambda p: torch.optim.RMSprop(p, lr=1e-3),
}


def lengths(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int = 5) -> dict:
    """|estimate| / |gradient| per parameter tensor and in total, and the cosine, averaged over draws."""
    model = copy.deepcopy(model).eval()
    exact = copy.deepcopy(model)
    F.nll_loss(exact(x), y).backward()
    true = {n: p.grad for n, p in exact.named_parameters()}
    flat_true = torch.cat([g.flatten() for g in true.values()])
    results = {}
    for perturbation in ("weight", "activity"):
        reduction = "none" if perturbation == "activity" else "mean"
        for correction in (False, True):
            ratios: dict[str, float] = {}
            for seed in range(draws):
                fg = frog.ForwardGradient(16, engine="sim", perturbation=perturbation, seed=seed,
                                          scale_correction=correction)
                fg.fill_grad(model, lambda m, r=reduction: F.nll_loss(m(x), y, reduction=r))
                grads = {n: p.grad for n, p in model.named_parameters()}
                flat = torch.cat([g.flatten() for g in grads.values()])
                row = {n: float(grads[n].norm() / true[n].norm()) for n in grads}
                row.update(total=float(flat.norm() / flat_true.norm()), cosine=float(flat @ flat_true / flat.norm()
                                                                                     / flat_true.norm()))
                ratios = {n: ratios.get(n, 0.0) + v / draws for n, v in row.items()}
            results[f"{perturbation} {'corrected' if correction else 'plain'}"] = ratios
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--perturbations", nargs="+", default=["activity", "weight"])
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    example = load_example("fashion_cnn")
    data = load_dataset("fashion-mnist")
    test = Split(data.test.x[:1000], data.test.y[:1000])
    torch.manual_seed(args.seed)
    length = lengths(example.Net(), data.train.x[:64], data.train.y[:64])
    names = list(next(iter(length.values())))
    print("|estimate| / |gradient| on one batch (mean of 5 draws), per parameter tensor, in total, and the cosine")
    print(f"{'':<20}" + "".join(f"{n:>13}" for n in names))
    for setting, row in length.items():
        print(f"{setting:<20}" + "".join(f"{row[n]:>13.4f}" for n in names))
    results = {}
    print(f"\n{'perturbation':<13}{'optimizer':<14}{'plain: loss, acc':>20}{'corrected: loss, acc':>24}")
    for perturbation in args.perturbations:
        reduction = "none" if perturbation == "activity" else "mean"
        for name in args.optimizers:
            row = {}
            for correction in (False, True):
                torch.manual_seed(args.seed)
                model = example.Net()
                optimizer = OPTIMIZERS[name](model.parameters())
                fg = frog.ForwardGradient(16, engine="sim", perturbation=perturbation, seed=args.seed,
                                          scale_correction=correction)
                generator = torch.Generator().manual_seed(args.seed)
                for step, (x, y) in enumerate(batches(data.train, 64, shuffle=True, generator=generator)):
                    if step == args.steps:
                        break
                    optimizer.zero_grad()
                    fg.fill_grad(model, lambda m, x=x, y=y, r=reduction: F.nll_loss(m(x), y, reduction=r))
                    optimizer.step()
                row["corrected" if correction else "plain"] = example.evaluate(model, test)
            results[f"{perturbation} {name}"] = row
            plain, corrected = row["plain"], row["corrected"]
            print(f"{perturbation:<13}{name:<14}{plain[0]:>12.3f}, {plain[1]:.3f}{corrected[0]:>16.3f}, {corrected[1]:.3f}",
                  flush=True)
    print_result("optimizers", steps=args.steps, lengths=length, results=results)


if __name__ == "__main__":
    main()
