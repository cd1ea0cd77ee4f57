"""How well each kind of local head guesses the true per-example gradient at every hidden block's output.

The guess of a hidden block is only worth the component of the true gradient along it (frog's
projection takes exactly that), so the cosine between a head's guess and autograd's per-example
gradient dl_i/dh_{b,i} says how much of block b's gradient a head can deliver: its square is the share.

Protocol: the network is trained by backprop for --bp-steps steps (seed 0, lr 0.1, batch 64, so that it
is past its initialization), then frozen; every head kind (`frog.LocalHeads` with its options) is
trained by its own local loss for --head-steps steps on the same batches, then the cosines are averaged
over the examples of --eval-batches further batches. Writes OUT/guess_alignment.csv (model, heads, block,
cosine, cosine_squared) and prints a table.

    python benchmarks/studies/guess_alignment.py [--model vit] [--heads mean mean:64 first first:64] [--quick]

A head kind is TOKENS[:CHANNELS]: what token blocks' heads read (mean or first) and their hidden
channels (`LocalHeads(tokens=..., hidden_channels=...)`); on images and feature vectors TOKENS is ignored.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
import torch.nn.functional as F

from frog import LocalHeads
from frog.training.data import batches, load_dataset
from frog.training.models import make_model


def head_kind(spec: str) -> LocalHeads:
    """``mean``, ``first:64`` ... -> the LocalHeads they name (exact_output off: the last block is not measured)."""
    tokens, _, channels = spec.partition(":")
    return LocalHeads(10, lr=0.1, seed=0, tokens=tokens, hidden_channels=int(channels or 0))


def block_outputs(blocks, x: torch.Tensor, detach: bool) -> list[torch.Tensor]:
    """Each block's output (B, *features_b); with ``detach`` each block starts from a detached input."""
    outputs, h = [], x
    for block in blocks:
        h = block(h.detach() if detach else h)
        outputs.append(h)
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit", choices=["fc", "resnet18", "vit"])
    parser.add_argument("--heads", nargs="+", default=["mean", "mean:64", "first", "first:64"])
    parser.add_argument("--bp-steps", type=int, default=100)
    parser.add_argument("--head-steps", type=int, default=200)
    parser.add_argument("--eval-batches", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="digits, a few steps: checks that the script runs")
    parser.add_argument("--out", default="runs/guess_alignment")
    args = parser.parse_args()
    dataset = "digits" if args.quick else "fashion-mnist"
    steps = (5, 5, 1) if args.quick else (args.bp_steps, args.head_steps, args.eval_batches)

    torch.manual_seed(0)
    data = load_dataset(dataset, None, split_seed=0)
    model = make_model(args.model, data.input_shape, data.num_classes, width=256)
    generator = torch.Generator().manual_seed(0)
    stream = iter(batches(data.train, 64, shuffle=True, generator=generator, device=torch.device("cpu")))

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps[0]):
        x, y = next(stream)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()  # frozen: BatchNorm's running statistics stay as they are
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = list(model)
    kinds = {spec: head_kind(spec) for spec in args.heads}
    cosines: dict[tuple[str, int], list[torch.Tensor]] = {  # per-example cosines of each head kind and block
        (spec, b): [] for spec in kinds for b in range(len(blocks) - 1)}
    for step in range(steps[1] + steps[2]):
        x, y = next(stream)
        with torch.no_grad():
            outputs = block_outputs(blocks, x, detach=True)
        truth = None
        if step >= steps[1]:  # autograd's per-example gradients at every block output (rows: examples)
            with torch.enable_grad():
                points = block_outputs(blocks, x.requires_grad_(), detach=False)
                truth = torch.autograd.grad(F.cross_entropy(points[-1], y, reduction="sum"), points[:-1])
        for spec, heads in kinds.items():
            guesses = heads.guesses(outputs, y, torch.zeros(len(y)))
            if truth is None:
                continue
            for b, true in enumerate(truth):
                cosines[spec, b].append(F.cosine_similarity(guesses[b].flatten(1), true.flatten(1), dim=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"model": args.model, "heads": spec, "block": b + 1, "cosine": f"{torch.cat(c).mean():.3f}",
             "cosine_squared": f"{torch.cat(c).square().mean():.3f}"} for (spec, b), c in cosines.items()]
    with (out / "guess_alignment.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"| heads | cosine with the true per-example gradient, blocks 1..{len(blocks) - 1} |\n|---|---|")
    for spec in kinds:
        print(f"| {spec} | " + " / ".join(r["cosine"] for r in rows if r["heads"] == spec) + " |")
    print(f"wrote {out / 'guess_alignment.csv'}")


if __name__ == "__main__":
    main()
