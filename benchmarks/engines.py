"""Time one training step (fill_grad + SGD step) per engine, side by side in one run.

Model (--model): ``mlp``, MLP 784-1024-1024-10 (ReLU, an nn.Sequential of blocks), batch 64; or
``gpt``, the character-level GPT of examples/char_gpt.py (2 blocks, width 64, 4 heads, context 64,
F.scaled_dot_product_attention, tied weights, dropout 0.1; a vocabulary of 96), batch 32, whose
blocks for activity perturbation are found automatically; or ``resnet18`` / ``vit``, the Table I networks
of frog.training.models on Fashion-MNIST-shaped random images (1 x 28 x 28, 10 classes, train mode), batch 64. For each k and each perturbation (weight
with the tangent samplers of --samplers: dense ``normal``, ``lowrank`` and ``input-span`` of rank
--rank; activity): engines jvp, loop, sim, fd and plain backprop. Prints the median
step times, the ratios to backprop and jvp/loop, the achieved GFLOP/s of the jvp engine against a
plain matmul measured in the same run, the share of tangent generation + Gram in a jvp step
(timed alone, as a step generates them), the matmul share of the rest of that step ("rest %mm":
the jvp FLOPs over the step time minus generation + Gram), and a final JSON line.

    python benchmarks/engines.py [--model mlp|gpt|resnet18|vit] [--ks 1 4 16 64]
                                 [--perturbations weight activity]
                                 [--samplers normal lowrank input-span] [--rank 1]
                                 [--engines jvp loop sim fd] [--repeats 3] [--threads N] [--device cpu|cuda]
                                 [--no-fused-batchnorm]

Activity perturbation also comes as ``activity-per-example`` (independent, ReLU-masked tangents per
example), ``activity-guess`` (the first L tangents guessed by frog.guesses.LocalHeads, inside k) and
``activity-guess-per-example`` (both): pass them to --perturbations. Their generation share is that of
shared activity tangents (the FLOP model counts the same passes: guesses are tangents inside k).

With --no-fused-batchnorm the forward-mode engines (jvp, loop) are also timed without frog's fused
BatchNorm jvp rule (``frog.forward_mode.batchnorm.FUSED`` off: PyTorch's op-by-op jvp of train-mode BatchNorm), as
extra columns ``jvp-unfused`` / ``loop-unfused`` beside the fused ones, for a before/after in one run.

For the GPT, ResNet18 and ViT only times and ratios are printed (no FLOP model), engines jvp and
sim by default.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import EXAMPLES, median_time, print_result
from torch import nn

import frog
import frog.forward_mode.batchnorm
import frog.guesses
import frog.training.models

LAYERS = [(784, 1024), (1024, 1024), (1024, 10)]
GPT_VOCAB = 96
IMAGE_SHAPE, IMAGE_CLASSES = (1, 28, 28), 10  # Fashion-MNIST, for resnet18 and vit
DEFAULT_BATCH = {"mlp": 64, "gpt": 32, "resnet18": 64, "vit": 64}
ACTIVITY_VARIANTS = {  # --perturbations name -> ForwardGradient options (docs/guides/closing-the-gap.md)
    "activity": {},
    "activity-per-example": {"per_example": True},
    "activity-guess": {"guess": True},
    "activity-guess-per-example": {"per_example": True, "guess": True},
}
MIN_SECONDS = 0.5  # every median_time: at least this long spent on the timed calls (more calls for fast steps)
# engine name suffix: that engine with PyTorch's BatchNorm jvp (frog.forward_mode.batchnorm.FUSED off)
UNFUSED = "-unfused"


def make_gpt(device: str) -> nn.Module:
    """The GPT of examples/char_gpt.py (one definition, imported from there)."""
    sys.path.insert(0, str(EXAMPLES))
    from char_gpt import GPT

    torch.manual_seed(0)
    return GPT(GPT_VOCAB).to(device)


def make_model(device: str) -> nn.Module:
    """The MLP as an nn.Sequential of blocks: Linear+ReLU, Linear+ReLU, Linear."""
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(LAYERS):
        last = i == len(LAYERS) - 1
        blocks.append(nn.Linear(fan_in, fan_out) if last else nn.Sequential(nn.Linear(fan_in, fan_out), nn.ReLU()))
    return nn.Sequential(*blocks).to(device)


def workload(name: str, batch: int, device: str):
    """``(model, x, y, losses, description)`` of benchmark model ``name``: ``losses(m, reduction)`` is the
    cross-entropy of model m on the random batch x with targets y, per sample (B,) or per token (B, 64)
    with reduction "none"."""
    if name == "gpt":  # characters (B, 64) and their successors
        model = make_gpt(device)
        x = torch.randint(0, GPT_VOCAB, (batch, 64), device=device)
        y = torch.randint(0, GPT_VOCAB, (batch, 64), device=device)

        def losses(m: nn.Module, reduction: str) -> torch.Tensor:
            return nn.functional.cross_entropy(m(x)[0].transpose(1, 2), y, reduction=reduction)

        return model, x, y, losses, f"GPT (examples/char_gpt.py), batch {batch} x 64 characters"
    if name == "mlp":
        model, x = make_model(device), torch.randn(batch, 784, device=device)
        description = f"MLP 784-1024-1024-10, batch {batch}"
    else:
        torch.manual_seed(0)
        model = frog.training.models.make_model(name, IMAGE_SHAPE, IMAGE_CLASSES).to(device)
        x = torch.randn(batch, *IMAGE_SHAPE, device=device)
        description = f"{name} (frog.training.models), Fashion-MNIST-shaped input 1x28x28, batch {batch}"
    y = torch.randint(0, 10, (batch,), device=device)

    def losses(m: nn.Module, reduction: str) -> torch.Tensor:
        return nn.functional.cross_entropy(m(x), y, reduction=reduction)

    return model, x, y, losses, description


def jvp_flops(batch: int, k: int, perturbation: str, sampler: str = "normal", rank: int = 1) -> float:
    """Primal once, plus per tangent and layer: W x_t for every layer but the first; with dense weight
    tangents also W_t x, with structured ones (x V) U^T at 2 B (i + o) r."""
    primal = sum(2 * batch * i * o for i, o in LAYERS)
    per_tangent = 0
    for layer, (i, o) in enumerate(LAYERS):
        per_tangent += 2 * batch * i * o * (layer > 0)
        if perturbation == "weight":
            per_tangent += 2 * batch * i * o if sampler == "normal" else 2 * batch * (i + o) * rank
    return primal + k * per_tangent


def matmul_gflops(device: str, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    seconds = median_time(lambda: a @ b, repeats, device, MIN_SECONDS)
    return 2 * size**3 / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(DEFAULT_BATCH), default="mlp")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--perturbations", nargs="+", default=["weight", "activity"])
    parser.add_argument("--samplers", nargs="+", default=["normal", "lowrank", "input-span"],
                        help="tangents of weight perturbation")
    parser.add_argument("--rank", type=int, default=1, help="rank of the lowrank and input-span tangents")
    parser.add_argument("--engines", nargs="+", default=None, help="default: jvp loop sim fd (mlp), jvp sim (others)")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 (gpt), 64 (others)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tangent-budget-mb", type=float, default=frog.engines.DEFAULT_TANGENT_BUDGET_MB,
                        help="ForwardGradient's tangent budget (a small one: tangents regenerated, not kept)")
    parser.add_argument("--no-fused-batchnorm", action="store_true",
                        help="also time jvp and loop without frog's fused BatchNorm jvp rule (columns ENGINE-unfused)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    flops = args.model == "mlp"  # the FLOP model and the tangent-generation share: the MLP only
    args.engines = args.engines or (["jvp", "loop", "sim", "fd"] if flops else ["jvp", "sim"])
    if args.no_fused_batchnorm:  # each forward-mode engine, then itself without the fused rule
        args.engines = [name for e in args.engines for name in ([e, e + UNFUSED] if e in ("jvp", "loop") else [e])]
    args.batch = args.batch or DEFAULT_BATCH[args.model]
    model, x, y, losses, model_name = workload(args.model, args.batch, device)
    classes = GPT_VOCAB if args.model == "gpt" else IMAGE_CLASSES
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def backprop_step() -> None:
        optimizer.zero_grad()
        losses(model, "mean").backward()
        optimizer.step()

    def engine_step(name: str, k: int, perturbation: str, sampler: str):
        rank = args.rank if sampler in frog.tangents.STRUCTURED else 1
        engine, fused = name.removesuffix(UNFUSED), not name.endswith(UNFUSED)
        options = dict(ACTIVITY_VARIANTS.get(perturbation, {}))
        if options.get("guess"):
            options["guess"] = frog.guesses.LocalHeads(classes)
        estimator = frog.ForwardGradient(k, "project", engine=engine, seed=0, perturbation=perturbation.split("-")[0],
                                         tangent_budget_mb=args.tangent_budget_mb, sampler=sampler, rank=rank,
                                         **options)
        reduction = "none" if perturbation.startswith("activity") else "mean"

        def step() -> None:
            frog.forward_mode.batchnorm.FUSED = fused
            try:
                estimator.fill_grad(model, lambda m: losses(m, reduction), targets=y)
            finally:
                frog.forward_mode.batchnorm.FUSED = True
            optimizer.step()

        return step

    block_shapes = {  # what the tangents of a step cover: parameter tensors, or block outputs (features)
        "weight": [p.shape for p in model.parameters()],
        **{variant: [torch.Size((fan_out,)) for _, fan_out in LAYERS] for variant in ACTIVITY_VARIANTS},
    }

    def tangents_and_gram(k: int, perturbation: str, sampler: str):
        rank = args.rank if sampler in frog.tangents.STRUCTURED else 1
        generator_only = frog.ForwardGradient(k, "project", seed=0, tangent_budget_mb=args.tangent_budget_mb,
                                              sampler=sampler, rank=rank)

        def run() -> None:
            generator_only.plan(block_shapes[perturbation], x).gram()  # every block, and their Gram

        return run

    backprop = median_time(backprop_step, 5 * args.repeats, device, MIN_SECONDS)
    peak = matmul_gflops(device)
    results: dict[str, dict[str, float]] = {}
    print(f"{model_name}, device {device}, threads {torch.get_num_threads()}, "
          f"tangent budget {args.tangent_budget_mb:g} MB; "
          f"backprop {backprop * 1e3:.1f} ms; plain matmul {peak:.0f} GFLOP/s")
    extra = f"{'jvp/sim':>10}" if not flops else \
        f"{'loop/jvp':>10}{'jvp GFLOP/s':>13}{'% matmul':>10}{'gen+gram %':>12}{'rest %mm':>12}"
    widths = {e: max(11, len(e) + 4) for e in args.engines}
    print(f"{'perturbation':<28}{'k':>4}" + "".join(f"{e + ' ms':>{widths[e]}}{'x bp':>7}" for e in args.engines) + extra)
    settings = [(p, s) for p in args.perturbations for s in (args.samplers if p == "weight" else ["normal"])]
    for perturbation, sampler in settings:
        label = perturbation if perturbation.startswith("activity") else f"weight/{sampler}"
        for k in args.ks:
            times = {e: median_time(engine_step(e, k, perturbation, sampler), args.repeats, device, MIN_SECONDS)
                     for e in args.engines}
            # backprop again beside this row (the machine's speed drifts): the ratios use the mean of both
            backprop = (backprop + median_time(backprop_step, 5 * args.repeats, device, MIN_SECONDS)) / 2
            row = {f"{e}_ms": t * 1e3 for e, t in times.items()}
            row["backprop_ms"] = backprop * 1e3
            row.update({f"{e}_over_backprop": t / backprop for e, t in times.items()})
            line = f"{label:<28}{k:>4}" + "".join(f"{t * 1e3:>{widths[e]}.1f}{t / backprop:>7.1f}" for e, t in times.items())
            if not flops and "jvp" in times and "sim" in times:
                row["jvp_over_sim"] = times["jvp"] / times["sim"]
                line += f"{row['jvp_over_sim']:>10.2f}"
            elif "jvp" in times and flops:
                achieved = jvp_flops(args.batch, k, perturbation, sampler, args.rank) / times["jvp"] / 1e9
                row.update(jvp_gflops=achieved, jvp_share_of_matmul=achieved / peak)
                loop_ratio = times["loop"] / times["jvp"] if "loop" in times else float("nan")
                row["loop_over_jvp"] = loop_ratio
                # input-span: the factors and their Gram cost as lowrank's (its bases come from the pass)
                generation = median_time(tangents_and_gram(k, perturbation, "lowrank" if sampler == "input-span"
                                                           else sampler), args.repeats, device, MIN_SECONDS)
                row["tangents_gram_share_of_jvp"] = generation / times["jvp"]
                share, rest = f"{100 * row['tangents_gram_share_of_jvp']:.1f}", ""
                # the rest of the step: jvp passes, estimate, SGD (derived: step minus generation + Gram)
                if times["jvp"] > generation:
                    row["jvp_share_of_matmul_without_generation"] = achieved / peak * times["jvp"] / (times["jvp"] - generation)
                    rest = f"{100 * row['jvp_share_of_matmul_without_generation']:.0f}"
                line += f"{loop_ratio:>10.2f}{achieved:>13.1f}{100 * achieved / peak:>10.0f}{share:>12}{rest:>12}"
            print(line, flush=True)
            results[f"{label}_k{k}"] = {name: round(v, 3) for name, v in row.items()}
    print_result("engines", model=args.model, device=device, tangent_budget_mb=args.tangent_budget_mb, rank=args.rank,
                 backprop_ms=round(backprop * 1e3, 2), matmul_gflops=round(peak, 1), results=results)


if __name__ == "__main__":
    main()
