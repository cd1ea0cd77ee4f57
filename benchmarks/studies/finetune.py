"""Fine-tuning at equal forward-pass budgets: backprop, backprop with checkpointing, MeZO and frog.

A character GPT (examples/char_gpt.py: width 128, 4 blocks, 4 heads, context 64, no dropout) is
pretrained with backprop (AdamW) on the GPL-3 text and fine-tuned on the MPL-2.0 text, both from
Debian's base-files (/usr/share/common-licenses; another license, so another vocabulary use and
phrasing). The last tenth of the MPL-2.0 text is held out: the held-out loss is the mean
cross-entropy over fixed windows of it. The vocabulary is the union of both texts' characters.

Every method fine-tunes from the same weights with plain SGD on the same batches, for the same
budget of forward-pass equivalents (FP), and takes the best step size of its grid (by the final
held-out loss). bp's grid is 0.1, 0.3, 1. FP counts a step by its matrix products, a forward pass being 1:

=================  ==========  ===========================================================
method             FP a step   step
=================  ==========  ===========================================================
bp                 3           forward + backward (2); SGD on p.grad
bp-checkpoint      4           every block under torch.utils.checkpoint: its forward again
mezo               2           frog.MeZO(eps=1e-3).update: two perturbed forwards, in place
frog-jvp k         1 + k       ForwardGradient(k, sampler="lowrank", engine="jvp").update: the
                               primal once, k tangent streams (each as many products as a forward)
frog-loop k        2 k         the same with engine="loop": primal and one stream per tangent
frog-activity k    4 + k       activity perturbation with guesses (frog.LocalHeads): a plain
                               pass, the jvp pass (1 + k) and the blocks' local products (2)
=================  ==========  ===========================================================

frog's weight-perturbation estimators keep ForwardGradient's default length correction: the projection
times E[chi_n] / E[chi_k], an estimate of about the gradient's length. At k = 1 that is MeZO's estimate
along a low-rank direction divided by sqrt(n) (MeZO's z has |z|^2 about n), and the best step size
grows about as sqrt(k): so frog's step sizes sit around MeZO's best (1e-4, found first) times
sqrt(n k): 0.1 and 0.3 for k = 1 (equally good), then 0.3 for k = 4 and 1 for k = 16 (one each: a run
takes 10-15 minutes on 2 cores). frog-loop gives frog-jvp's estimates (tests/test_lean.py), so the
same curve, at k times the primal passes: only --quick runs it (at frog-jvp's best step size); its
memory is in benchmarks/memory_frontier.py. With guesses there is no correction (the guessed components have
the gradient's length): grid 0.1, 0.3, backprop's best two. MeZO keeps the MeZO paper's eps
1e-3 and one direction; its SGD grid 1e-7..1e-5 for OPT-13B (1.3e10 parameters) does not carry over
by a formula. Scaled by 1/n, as SPSA's n-fold squared length suggests, it would be 1.6e-2..1.6 for this
model's 0.8M parameters, above backprop's own; on the --quick model (29k parameters) the scaled 1e-6,
0.45, diverged within five steps (the stable step shrinks with the loss's effective rank, not with n:
MeZO's own analysis). So MeZO gets a wider grid placed below backprop's, 1e-4, 3e-4, 1e-3, 1e-2, 1e-1: three
decades instead of the paper's two (and 3e-4 between the best two), the best taken as for every method.

Each (method, k, step size) runs in its own process; its ``peak_mb`` is the model's size plus the
highest RSS of its training steps over the memory before them (evaluations excluded, a warm-up step
on a copy of the weights first, so that code loaded once is not counted; see benchmarks/memory_frontier.py).
``seconds`` is the training time so far, evaluations excluded.

Writes DIR/finetune.csv (``method,k,forward_passes,heldout_loss,peak_mb,seconds``: the chosen step
size's evaluation points), DIR/grid.csv (every step size, with an ``lr`` column; a rerun skips the
runs there), DIR/finetune.png (held-out loss against FP and against seconds) and prints the
forward passes each frog method needs to reach MeZO's final held-out loss.

    python benchmarks/studies/finetune.py [--out DIR] [--quick] [--budget FP] [--methods bp mezo frog-jvp ...]
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from _common import MB, measure_step, memory_in_use, print_result, reply, run_child, tensor_mb
from char_gpt import GPT

import frog

PRETRAIN_TEXT = Path("/usr/share/common-licenses/GPL-3")
FINETUNE_TEXT = Path("/usr/share/common-licenses/MPL-2.0")
COLUMNS = ["method", "k", "forward_passes", "heldout_loss", "peak_mb", "seconds"]
BP_GRID = [0.1, 0.3, 1.0]
FROG_GRID = {1: [0.1, 0.3], 4: [0.3], 16: [1.0]}  # about MeZO's best times sqrt(n k) (docstring)
GUESS_GRID = [0.1, 0.3]
MEZO_GRID = [1e-4, 3e-4, 1e-3, 1e-2, 1e-1]  # the MeZO paper's grid 1e-7..1e-5 (OPT-13B), moved to this model (docstring)
RUNS = [("bp", 0), ("bp-checkpoint", 0), ("mezo", 1), ("frog-jvp", 1), ("frog-jvp", 4), ("frog-jvp", 16),
        ("frog-activity", 16)]
QUICK_RUNS = [*RUNS[:-1], ("frog-loop", 4), RUNS[-1]]  # frog-loop: frog-jvp's estimates (docstring)
SIZES = {  # model and schedule: full and --quick
    False: {"dim": 128, "depth": 4, "context": 64, "batch": 16, "pretrain_steps": 500, "budget": 3000,
            "evals": 15, "eval_windows": 64},
    True: {"dim": 32, "depth": 2, "context": 32, "batch": 4, "pretrain_steps": 30, "budget": 96,
           "evals": 2, "eval_windows": 8},
}


def forward_passes(method: str, k: int) -> int:
    """Forward-pass equivalents of one step (module docstring)."""
    return {"bp": 3, "bp-checkpoint": 4, "mezo": 2 * max(k, 1), "frog-jvp": 1 + k, "frog-loop": 2 * k,
            "frog-activity": 4 + k}[method]


def texts() -> tuple[torch.Tensor, torch.Tensor, int]:
    """Both texts as indices over their joint vocabulary: (pretraining (N,), fine-tuning (M,), vocabulary)."""
    missing = [str(p) for p in (PRETRAIN_TEXT, FINETUNE_TEXT) if not p.exists()]
    if missing:
        raise SystemExit(f"finetune.py needs {', '.join(missing)} (Debian's base-files package)")
    pretrain, finetune = PRETRAIN_TEXT.read_text(encoding="utf-8"), FINETUNE_TEXT.read_text(encoding="utf-8")
    lookup = {c: i for i, c in enumerate(sorted(set(pretrain) | set(finetune)))}
    encode = lambda text: torch.tensor([lookup[c] for c in text])
    return encode(pretrain), encode(finetune), len(lookup)


def windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next characters (B, T) of the windows starting at ``starts``."""
    rows = torch.stack([data[s: s + context + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def random_batch(data: torch.Tensor, size: int, context: int, generator: torch.Generator):
    return windows(data, torch.randint(len(data) - context - 1, (size,), generator=generator), context)


def make_model(vocab: int, sizes: dict[str, int]) -> GPT:
    return GPT(vocab, context=sizes["context"], dim=sizes["dim"], depth=sizes["depth"], heads=4, dropout=0.0)


def pretrained(out: Path, quick: bool) -> Path:
    """Pretrain on GPL-3 with backprop (AdamW) once; the weights are cached in ``out``."""
    sizes = SIZES[quick]
    path = out / f"pretrained-{'quick' if quick else 'full'}.pt"
    if path.exists():
        return path
    data, _, vocab = texts()
    torch.manual_seed(0)
    model = make_model(vocab, sizes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    for step in range(sizes["pretrain_steps"]):
        x, y = random_batch(data, 32, sizes["context"], generator)
        optimizer.zero_grad(set_to_none=True)
        loss = model(x, y)[1]
        loss.backward()
        optimizer.step()
        if step % 250 == 0:
            print(f"pretraining step {step}: loss {loss.item():.3f}", flush=True)
    torch.save(model.state_dict(), path)
    return path


def stepper(method: str, k: int, lr: float, model: GPT, vocab: int):
    """step(x, y) -> loss for ``method``: plain SGD at ``lr``."""
    mean_loss = lambda x, y: lambda m: m(x, y)[1]
    if method in ("bp", "bp-checkpoint"):
        model.checkpoint = method == "bp-checkpoint"
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)

        def backprop(x, y):
            optimizer.zero_grad(set_to_none=True)
            loss = mean_loss(x, y)(model)
            loss.backward()
            optimizer.step()
            return loss.detach()
        return backprop
    if method == "mezo":
        mezo = frog.MeZO(eps=1e-3, directions=k, seed=0)
        return lambda x, y: mezo.update(model, mean_loss(x, y), lr)
    if method == "frog-activity":
        fg = frog.ForwardGradient(k, perturbation="activity", engine="jvp", seed=0, guess=frog.LocalHeads(vocab, seed=0))
        token_losses = lambda x, y: lambda m: F.cross_entropy(m(x)[0].transpose(1, 2), y, reduction="none")
        return lambda x, y: fg.update(model, token_losses(x, y), lr, targets=y)
    engine = {"frog-jvp": "jvp", "frog-loop": "loop"}[method]
    fg = frog.ForwardGradient(k, sampler="lowrank", engine=engine, perturbation="weight", seed=0)
    return lambda x, y: fg.update(model, mean_loss(x, y), lr)


def fine_tune(method: str, k: int, lr: float, quick: bool, weights: Path) -> list[dict[str, float]]:
    """In the child process: the evaluation points of one fine-tuning run."""
    sizes = SIZES[quick]
    torch.manual_seed(0)
    _, data, vocab = texts()
    split = len(data) * 9 // 10
    train, held_out = data[:split], data[split:]
    starts = torch.linspace(0, len(held_out) - sizes["context"] - 2, sizes["eval_windows"]).long()
    eval_x, eval_y = windows(held_out, starts, sizes["context"])
    model = make_model(vocab, sizes)
    initial = torch.load(weights)
    cost = forward_passes(method, k)
    steps = sizes["budget"] // cost
    every = max(1, steps // sizes["evals"])
    generator = torch.Generator().manual_seed(1)

    def heldout() -> float:
        with torch.no_grad():
            return model(eval_x, eval_y)[1].item()

    model.load_state_dict(initial)  # warm-up step on the same weights, then back: code loaded once stays out
    stepper(method, k, lr, copy.deepcopy(model), vocab)(*random_batch(train, sizes["batch"], sizes["context"], generator))
    generator.manual_seed(1)
    step = stepper(method, k, lr, model, vocab)
    heldout()
    rows = [{"forward_passes": 0, "heldout_loss": heldout(), "peak_mb": 0.0, "seconds": 0.0}]
    model_mb = tensor_mb([*model.parameters(), *model.buffers()])

    def guarded_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """The step's loss, or None where it stopped with a non-finite loss."""
        try:
            return step(x, y)
        except frog.NonFiniteError:
            return None

    peak, seconds = 0.0, 0.0
    for index in range(1, steps + 1):
        x, y = random_batch(train, sizes["batch"], sizes["context"], generator)
        baseline = memory_in_use()
        loss, took, high = measure_step(lambda x=x, y=y: guarded_step(x, y))
        seconds += took
        peak = max(peak, (high - baseline) / MB)
        if loss is None or not math.isfinite(float(loss)):
            rows.append({"forward_passes": index * cost, "heldout_loss": math.inf, "peak_mb": model_mb + peak,
                         "seconds": seconds})
            break
        if index % every == 0 or index == steps:
            rows.append({"forward_passes": index * cost, "heldout_loss": heldout(), "peak_mb": model_mb + peak,
                         "seconds": seconds})
    return rows


def grid(method: str, k: int, done: list[dict[str, str]]) -> list[float]:
    """The step sizes to try: MeZO's grid, frog's by k (module docstring), frog-loop only frog-jvp's best
    at the same k (the same estimates, so the same curve: it shows the time and memory)."""
    if method == "mezo":
        return MEZO_GRID
    if method == "frog-jvp":
        return FROG_GRID[k]
    if method == "frog-loop":
        finals = best_lrs(done, "frog-jvp", k)
        return [min(finals, key=finals.get)] if finals else FROG_GRID[k]
    return GUESS_GRID if method == "frog-activity" else BP_GRID


def best_lrs(done: list[dict[str, str]], method: str, k: int) -> dict[float, float]:
    """lr -> final held-out loss of the finished runs of (method, k)."""
    finals: dict[float, float] = {}
    for row in done:
        if row["method"] == method and int(row["k"]) == k:
            finals[float(row["lr"])] = float(row["heldout_loss"])  # the last row of a run is its final
    return finals


def fine_tune_in_child(method: str, k: int, lr: float, quick: bool, weights: Path) -> list[dict[str, float]]:
    """``fine_tune`` in a fresh process of this script."""
    return run_child(__file__, ["--child", method, str(k), repr(lr), str(weights)] + (["--quick"] if quick else []))


def plot(best: dict[tuple[str, int], list[dict[str, str]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (method, k), rows in best.items():
        label = method + (f" k={k}" if method.startswith("frog") or k > 1 else "")
        finite = [r for r in rows if math.isfinite(float(r["heldout_loss"]))]
        for axis, x in zip(axes, ("forward_passes", "seconds"), strict=True):
            axis.plot([float(r[x]) for r in finite], [float(r["heldout_loss"]) for r in finite], marker=".", label=label)
    axes[0].set(xlabel="forward-pass equivalents", ylabel="held-out loss (MPL-2.0)")
    axes[1].set(xlabel="training seconds (2-core CPU)", ylabel="held-out loss (MPL-2.0)")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def summary(best: dict[tuple[str, int], list[dict[str, str]]], lrs: dict[tuple[str, int], float]) -> dict:
    """Each run's final loss, peak and time; the forward passes each method needs to reach MeZO's final loss."""
    final = {key: rows[-1] for key, rows in best.items()}
    print(f"{'method':<18}{'lr':>10}{'FP':>8}{'held-out':>10}{'peak MB':>9}{'seconds':>9}{'FP to MeZO final':>18}")
    target = float(final[("mezo", 1)]["heldout_loss"]) if ("mezo", 1) in final else math.nan
    target = target if math.isfinite(target) else math.nan  # a diverged MeZO sets no mark
    mezo_budget = float(final[("mezo", 1)]["forward_passes"]) if ("mezo", 1) in final else math.nan
    result = {}
    for key, rows in best.items():
        reach = next((float(r["forward_passes"]) for r in rows if float(r["heldout_loss"]) <= target), None)
        last = final[key]
        name = f"{key[0]} k={key[1]}" if key[1] else key[0]
        print(f"{name:<18}{lrs[key]:>10.3g}{float(last['forward_passes']):>8.0f}{float(last['heldout_loss']):>10.4f}"
              f"{float(last['peak_mb']):>9.1f}{float(last['seconds']):>9.1f}{'-' if reach is None else f'{reach:.0f}':>18}")
        result[name] = {"lr": lrs[key], "heldout_loss": round(float(last["heldout_loss"]), 4),
                        "peak_mb": round(float(last["peak_mb"]), 1), "seconds": round(float(last["seconds"]), 1),
                        "forward_passes_to_mezo_final": reach,
                        "share_of_mezo_forward_passes": None if reach is None else round(reach / mezo_budget, 3)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/finetune")
    parser.add_argument("--quick", action="store_true", help="a tiny model and budget (the test suite)")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (names of finetune.csv)")
    parser.add_argument("--child", nargs=4, metavar=("METHOD", "K", "LR", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, k, lr, weights = args.child
        reply(fine_tune(method, int(k), float(lr), args.quick, Path(weights)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = pretrained(out, args.quick)
    _, _, vocab = texts()
    n = sum(p.numel() for p in make_model(vocab, SIZES[args.quick]).parameters())
    runs = [(m, k) for m, k in (QUICK_RUNS if args.quick else RUNS) if args.methods is None or m in args.methods]
    grid_path = out / ("grid-quick.csv" if args.quick else "grid.csv")
    done = list(csv.DictReader(grid_path.open())) if grid_path.exists() else []
    with grid_path.open("a", newline="") as file:
        writer = csv.DictWriter(file, ["lr", *COLUMNS])
        if not done:
            writer.writeheader()
        for method, k in runs:
            for lr in grid(method, k, done)[:1] if args.quick else grid(method, k, done):
                if any(r["method"] == method and int(r["k"]) == k and float(r["lr"]) == lr for r in done):
                    continue
                rows = [{"lr": lr, "method": method, "k": k, **r} for r in fine_tune_in_child(method, k, lr, args.quick, weights)]
                writer.writerows(rows)
                file.flush()
                done += [{key: str(value) for key, value in r.items()} for r in rows]
                print(f"{method} k={k} lr {lr:.3g}: held-out {rows[0]['heldout_loss']:.4f} -> {rows[-1]['heldout_loss']:.4f} "
                      f"after {rows[-1]['forward_passes']} FP, {rows[-1]['seconds']:.1f} s, peak {rows[-1]['peak_mb']:.1f} MB",
                      flush=True)
    best, lrs = {}, {}
    for method, k in runs:
        finals = best_lrs(done, method, k)
        lrs[(method, k)] = min(finals, key=finals.get)
        best[(method, k)] = [r for r in done if r["method"] == method and int(r["k"]) == k
                             and float(r["lr"]) == lrs[(method, k)]]
    with (out / "finetune.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for rows in best.values():
            writer.writerows(rows)
    plot(best, out / "finetune.png")
    print_result("finetune", parameters=n, quick=args.quick, runs=summary(best, lrs))


if __name__ == "__main__":
    main()
