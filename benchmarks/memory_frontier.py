"""Peak memory of one training step of a GPT against depth, sequence length and batch size.

The model is the GPT of examples/char_gpt.py (pre-norm blocks, SDPA attention, tied output layer,
no dropout), width --dim, 4 heads, 65 characters. Methods, each in a fresh process per setting:

- ``inference``: the loss under torch.no_grad (the floor every method pays);
- ``bp``: loss.backward() and a plain SGD step (p.grad: n numbers);
- ``bp-checkpoint``: the same with every block under torch.utils.checkpoint (only block inputs kept);
- ``mezo``: frog.MeZO(eps=1e-3).update, SPSA in place, no gradient buffer;
- ``frog-jvp`` / ``frog-loop``: frog.ForwardGradient(k, sampler="lowrank", engine=...).update, the lean
  step: low-rank weight tangents kept as factors, the estimate applied parameter by parameter in
  place, no gradient buffer; ``frog-loop-grad``: frog-loop with fill_grad and torch.optim.SGD (p.grad kept);
- ``frog-activity``: activity perturbation, jvp engine, update();
- ``local``: greedy local learning, frog.LocalLearning(frog.LocalHeads(65)).update: each hidden block
  trained by its head's next-character loss inside the forward pass, its graph freed before the next
  block runs (one block's graph at a time), the last block by the true loss; no p.grad, but the step
  holds a gradient-sized estimate (n numbers) until it applies it. The heads (built in the warm-up
  step, a Linear(dim, 65) per hidden block) are in the baseline, not in ``model_mb``.

Measurement: build the model and a batch, run one no_grad forward and a warm-up step, then reset the
RSS high-water mark (/proc/self/clear_refs) and run the measured step. The baseline is the RSS just
before the measured step less the gradients (p.grad) the warm-up left, which the step frees first:
so ``step_mb``, the high-water mark over the baseline, is what a step adds to the built model, and
what the first step loads once (library code paged in on first use, 46 MB for a jvp; a GPU does not
count it) is not in it. ``total_mb`` adds the model's parameters and buffers: what training needs
beside the Python runtime, the MeZO paper's measure. glibc returns freed blocks >= 128 KiB at once
(MALLOC_MMAP_THRESHOLD_), so the RSS follows the live tensors. With --device cuda:
torch.cuda.max_memory_allocated after reset_peak_memory_stats, over memory_allocated.

Sweeps around the centre setting (depth 8, sequence 512, batch 4): depth 2..16, sequence 128..1024,
batch 1..16. The sweeps measure inference, bp, bp-checkpoint, mezo, frog-loop k = 1 (the lean
path; frog-jvp k = 1 holds the same) and local; the other frog rows run at the centre only
(frog-loop's memory does not depend on k, frog-jvp's grows with it). Rows go to
DIR/memory_frontier.csv as they come, and a rerun skips the rows there; DIR/memory_frontier.png
plots step memory against each sweep.

    python benchmarks/memory_frontier.py [--out DIR] [--quick] [--device cpu|cuda] [--dim 256]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from _common import MB, measure_step, memory_in_use, print_result, reply, run_child, tensor_mb
from char_gpt import GPT

import frog

COLUMNS = ["sweep", "depth", "seq", "batch", "dim", "method", "k", "step_mb", "total_mb", "model_mb", "seconds"]
VOCAB = 65
SWEEP_METHODS = [("inference", 0), ("bp", 0), ("bp-checkpoint", 0), ("mezo", 1), ("frog-loop", 1), ("local", 0)]
QUICK_METHODS = [*SWEEP_METHODS, ("frog-jvp", 1), ("frog-jvp", 4), ("frog-activity", 4)]
CENTRE_METHODS = [*QUICK_METHODS, ("frog-jvp", 16), ("frog-loop", 4), ("frog-loop", 16), ("frog-loop-grad", 1),
                  ("frog-activity", 16)]


def settings(quick: bool) -> tuple[dict[str, int], dict[str, list[int]]]:
    """The centre setting and the values of each sweep."""
    if quick:
        return {"depth": 2, "seq": 32, "batch": 2}, {"depth": [1, 2]}
    return {"depth": 8, "seq": 512, "batch": 4}, {"depth": [2, 4, 8, 16], "seq": [128, 256, 512, 1024],
                                                  "batch": [1, 4, 16]}


def step_function(method: str, k: int, model: GPT, x: torch.Tensor, y: torch.Tensor):
    """One training step of ``method`` on the batch (x, y) (B, T)."""
    lr = 1e-6  # one step: the size does not matter for memory
    mean_loss = lambda m: m(x, y)[1]
    token_losses = lambda m: F.cross_entropy(m(x)[0].transpose(1, 2), y, reduction="none")  # (B, T)
    if method == "inference":
        return lambda: torch.no_grad()(mean_loss)(model)
    if method in ("bp", "bp-checkpoint"):
        model.checkpoint = method == "bp-checkpoint"
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)

        def backprop() -> None:
            optimizer.zero_grad(set_to_none=True)
            mean_loss(model).backward()
            optimizer.step()
        return backprop
    if method == "mezo":
        mezo = frog.MeZO(eps=1e-3, seed=0)
        return lambda: mezo.update(model, mean_loss, lr)
    if method == "frog-activity":
        fg = frog.ForwardGradient(k, perturbation="activity", engine="jvp", seed=0)
        return lambda: fg.update(model, token_losses, lr)
    if method == "local":  # the heads predict the next character of every token; built in the first step
        local = frog.LocalLearning(frog.LocalHeads(VOCAB))
        return lambda: local.update(model, token_losses, lr, targets=y)
    engine = "jvp" if method == "frog-jvp" else "loop"
    fg = frog.ForwardGradient(k, sampler="lowrank", engine=engine, perturbation="weight", seed=0)
    if method == "frog-loop-grad":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)

        def fill_and_step() -> None:
            fg.fill_grad(model, mean_loss)
            optimizer.step()
        return fill_and_step
    return lambda: fg.update(model, mean_loss, lr)


def measure(method: str, k: int, depth: int, seq: int, batch: int, dim: int, device: str) -> dict[str, float]:
    """In the child process: the step's peak over the built model (MB), the model's size and the time."""
    torch.manual_seed(0)
    model = GPT(VOCAB, context=seq, dim=dim, depth=depth, heads=4, dropout=0.0).to(device)
    x = torch.randint(0, VOCAB, (batch, seq), device=device)
    y = torch.randint(0, VOCAB, (batch, seq), device=device)
    model_mb = tensor_mb([*model.parameters(), *model.buffers()])
    step = step_function(method, k, model, x, y)
    with torch.no_grad():
        model(x, y)
    step()  # warm-up: what the first step loads once stays out of the measurement
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    baseline = memory_in_use(device) - grads
    _, seconds, peak = measure_step(step, device)
    step_mb = (peak - baseline) / MB
    return {"step_mb": step_mb, "model_mb": model_mb, "total_mb": step_mb + model_mb, "seconds": seconds}


def measure_in_child(method: str, k: int, setting: dict[str, int], dim: int, device: str) -> dict[str, float]:
    """``measure`` in a fresh process of this script."""
    return run_child(__file__, ["--child", method, str(k), str(setting["depth"]), str(setting["seq"]),
                                str(setting["batch"]), "--dim", str(dim), "--device", device])


def plan_rows(quick: bool) -> list[tuple[str, dict[str, int], str, int]]:
    """(sweep, setting, method, k) of every measurement, the centre setting first."""
    centre, sweeps = settings(quick)
    rows = [("centre", centre, method, k) for method, k in (QUICK_METHODS if quick else CENTRE_METHODS)]
    for sweep, values in sweeps.items():
        for value in values:
            setting = {**centre, sweep: value}
            if setting != centre:
                rows += [(sweep, setting, method, k) for method, k in SWEEP_METHODS]
    return rows


def key(sweep: str, setting: dict[str, int], method: str, k: int) -> tuple[str, ...]:
    return sweep, str(setting["depth"]), str(setting["seq"]), str(setting["batch"]), method, str(k)


def plot(rows: list[dict[str, str]], centre: dict[str, int], path: Path) -> None:
    """Step memory (MB, log scale) against depth, sequence length and batch, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    methods = sorted({(r["method"], int(r["k"])) for r in rows if r["sweep"] != "centre"}, key=str)
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for axis, sweep in zip(axes, ("depth", "seq", "batch"), strict=True):
        for method, k in methods:
            points = sorted((int(r[sweep]), float(r["step_mb"])) for r in rows if r["method"] == method
                            and int(r["k"]) == k and (r["sweep"] == sweep or r["sweep"] == "centre"))
            if points:
                label = method + (f" k={k}" if k else "") + (" (= inference)" if method == "mezo" else "")
                axis.plot(*zip(*points, strict=True), marker="o", label=label)
        fixed = ", ".join(f"{n} {v}" for n, v in centre.items() if n != sweep)
        axis.set(xscale="log", yscale="log", xlabel=sweep, ylabel="step memory over the model (MB)", title=fixed)
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_xticks(sorted({int(r[sweep]) for r in rows}), labels=sorted({r[sweep] for r in rows}, key=int))
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(rows: list[dict[str, str]]) -> dict[str, float]:
    """The centre setting's table with ratios; returns the summary ratios (total and step memory) that the
    result line prints."""
    centre = {(r["method"], int(r["k"])): r for r in rows if r["sweep"] == "centre"}
    step = {m: float(r["step_mb"]) for m, r in centre.items()}
    total = {m: float(r["total_mb"]) for m, r in centre.items()}
    reference = {"inference": ("inference", 0), "bp": ("bp", 0), "bp-checkpoint": ("bp-checkpoint", 0),
                 "mezo": ("mezo", 1)}
    print(f"{'method':<18}{'step MB':>9}{'total MB':>10}{'s':>8}" + "".join(f"{'x ' + n:>16}" for n in reference))
    for (method, k), r in centre.items():
        ratios = "".join(f"{total[(method, k)] / total[ref]:>9.2f} ({_ratio(step[(method, k)], step[ref])})"
                         if ref in total else f"{'':>16}" for ref in reference.values())
        print(f"{method + (f' k={k}' if k else ''):<18}{step[(method, k)]:>9.1f}{total[(method, k)]:>10.1f}"
              f"{float(r['seconds']):>8.2f}{ratios}")
    print("ratios: total memory (model + step), in brackets step memory alone")
    lean = [m for m in step if m[0] in ("frog-jvp", "frog-loop")]
    best = min(lean, key=lambda m: total[m]) if lean else None
    summary: dict[str, float] = {}
    if all(ref in total for ref in reference.values()):
        if best is not None:
            summary.update(_ratios("lean_frog", best, step, total, reference))
            summary["lean_frog_method"] = f"{best[0]} k={best[1]}"  # type: ignore[assignment]
        if ("local", 0) in step:
            summary.update(_ratios("local", ("local", 0), step, total, reference))
    return summary


def _ratios(prefix: str, method: tuple[str, int], step: dict, total: dict, reference: dict) -> dict[str, float]:
    """``method``'s total and step memory over each reference method's, as PREFIX_total_x_NAME and
    PREFIX_step_x_NAME."""
    found = {}
    for name, ref in reference.items():
        found[f"{prefix}_total_x_{name}"] = round(total[method] / total[ref], 3)
        found[f"{prefix}_step_x_{name}"] = round(step[method] / max(step[ref], 1e-9), 3)
    return found


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}" if reference > 0.05 else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/memory_frontier")
    parser.add_argument("--quick", action="store_true", help="tiny settings (the test suite)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=None, help="model width (default 256; 32 with --quick)")
    parser.add_argument("--child", nargs=5, metavar=("METHOD", "K", "DEPTH", "SEQ", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    dim = args.dim or (32 if args.quick else 256)
    if args.child:
        method, k, depth, seq, batch = args.child
        reply(measure(method, int(k), int(depth), int(seq), int(batch), dim, args.device))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "memory_frontier.csv"
    done: list[dict[str, str]] = list(csv.DictReader(path.open())) if path.exists() else []
    have = {(r["sweep"], r["depth"], r["seq"], r["batch"], r["method"], r["k"]) for r in done if r["dim"] == str(dim)}
    with path.open("a", newline="") as file:
        writer = csv.DictWriter(file, COLUMNS)
        if not done:
            writer.writeheader()
        for sweep, setting, method, k in plan_rows(args.quick):
            if key(sweep, setting, method, k) in have:
                continue
            result = measure_in_child(method, k, setting, dim, args.device)
            row = {"sweep": sweep, **setting, "dim": dim, "method": method, "k": k,
                   **{name: round(value, 3) for name, value in result.items()}}
            writer.writerow(row)
            file.flush()
            print(f"{sweep:<7} depth {setting['depth']:>2} seq {setting['seq']:>4} batch {setting['batch']:>2} "
                  f"{method:<15} k={k:<2} step {result['step_mb']:8.1f} MB  total {result['total_mb']:8.1f} MB  "
                  f"{result['seconds']:.2f} s", flush=True)
    rows = [r for r in csv.DictReader(path.open()) if r["dim"] == str(dim)]
    centre, _ = settings(args.quick)
    plot(rows, centre, out / "memory_frontier.png")
    summary = report(rows)
    print_result("memory_frontier", device=args.device, dim=dim, centre=centre, **summary)


if __name__ == "__main__":
    main()
