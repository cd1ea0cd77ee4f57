"""``frog reproduce``: the paper's analysis experiments (Sec. 4.1-4.3), its network experiments
(Sec. 4.4-4.5) and a REPORT.md (docs/reproducing.md, "The paper's experiments").

The full variant uses the paper's settings, with a 3-epoch slice of Table I (ResNet18 and ViT);
``quick`` cuts samples, dimensions, seeds and the Rosenbrock step budget, and runs ResNet18 and ViT
for a few steps only, so it runs in a few minutes on 2 CPU cores (the report says what was cut).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..training.data import MissingData
from ..training.functions import FUNCTIONS
from ..training.plots import plot_approximation, plot_optimization
from ..training.results import read_csv, write_csv
from . import approximation, optimization
from .networks import BEYOND_APPROACHES, PAPER_APPROACHES, SUMMARY_COLUMNS, NetworkRuns, run_networks
from .report import write_report

ANGLES = [15.0, 30.0, 45.0, 60.0, 75.0, 90.0]
POWERS_OF_TWO = [2**i for i in range(11)]


@dataclass(frozen=True)
class Settings:
    """Everything a reproduction run varies between the full and the quick variant."""

    name: str
    note: str
    approx_dims: list[int]
    approx_samples: int
    angle_samples: int
    opt_dims: list[int]
    opt_tangents: list[int]
    opt_seeds: list[int]
    angle_seeds: list[int]
    steps: dict[str, int | None] = field(default_factory=dict)
    networks: tuple[NetworkRuns, ...] = ()


QUICK_APPROACHES = [("bp", None), ("fg-mean", 16), ("frog", 16)]
TABLE1_APPROACHES = QUICK_APPROACHES  # the Table I slice: bp, fg-mean k = 16, frog k = 16
QUICK_IMAGES = 256  # images of each split in the quick ResNet18 / ViT runs: 4 steps of batch 64


def table1_runs(epochs: int, images: int | None = None) -> tuple[NetworkRuns, ...]:
    """ResNet18 and ViT on Fashion-MNIST with bp, fg-mean and frog (k = 16), seed 0, the paper's
    simulation engine and MNIST step sizes (``sota_nns.csv``), activity perturbation."""
    return tuple(NetworkRuns(["fashion-mnist"], [None], TABLE1_APPROACHES, [0], epochs=epochs, model=model,
                             images=images) for model in ("resnet18", "vit"))


FULL = Settings(
    name="full", note="The paper's settings (Sec. 4.1-4.4); Table I (Sec. 4.5): ResNet18 and ViT on "
                      "Fashion-MNIST for 3 epochs, bp, fg-mean k = 16 and frog k = 16, seed 0, sim engine.",
    approx_dims=POWERS_OF_TWO, approx_samples=1000, angle_samples=1000,
    opt_dims=POWERS_OF_TWO, opt_tangents=[1, 2, 4, 16], opt_seeds=[0, 1, 2, 3, 4], angle_seeds=[0, 1, 2, 3, 4],
    networks=(NetworkRuns(["fashion-mnist"], [256, 1024, 4096], PAPER_APPROACHES, [0, 1, 2], epochs=200),
              NetworkRuns(["fashion-mnist"], [256, 1024], BEYOND_APPROACHES, [0, 1, 2], epochs=200),
              *table1_runs(epochs=3)),
)
QUICK = Settings(
    name="quick",
    note="Quick variant: approximation at n = 64 only, angle approximation with 300 samples; optimization "
         "for n in {4, 16, 64}, k in {1, 16}, seeds {0, 1}, angle optimization seed 0, Rosenbrock cut to 2500 steps; "
         "networks: FC-256 on digits for 20 epochs and on Fashion-MNIST for 2 epochs, bp, fg-mean k = 16 and "
         "frog k = 16, seed 0, sim engine, and beyond the paper frog k = 16 with guesses from local heads and local "
         "learning with the same heads on Fashion-MNIST (the paper's simulation: the same gradients as forward mode where the "
         "samples do not interact; ResNet18's BatchNorm in train mode couples them, see benchmarks/batchnorm.py); "
         f"ResNet18 and ViT on the first {QUICK_IMAGES} images of each Fashion-MNIST split for 1 epoch (4 steps): "
         "a check that they train, not Table I.",
    approx_dims=[64], approx_samples=1000, angle_samples=300,
    opt_dims=[4, 16, 64], opt_tangents=[1, 16], opt_seeds=[0, 1], angle_seeds=[0], steps={"rosenbrock": 2500},
    networks=(NetworkRuns(["digits"], [256], QUICK_APPROACHES, [0], epochs=20),
              NetworkRuns(["fashion-mnist"], [256], QUICK_APPROACHES, [0], epochs=2),
              NetworkRuns(["fashion-mnist"], [256], BEYOND_APPROACHES, [0], epochs=2),
              *table1_runs(epochs=1, images=QUICK_IMAGES)),
)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def reproduce(out: Path, settings: Settings = FULL, engine: str = "jvp") -> Path:
    """Run Fig. 3, 4 and 5 and the network runs of ``settings`` into ``out`` and write ``out/REPORT.md``;
    returns its path.

    Every CSV row is written as it is computed; rerunning resumes where a run stopped.
    """
    seconds: dict[str, float] = {}

    approx_dir, angle_dir = out / "approximation", out / "angles"
    opt_dir, angle_opt_dir = out / "optimization", out / "angle_optimization"
    for folder in (approx_dir, angle_dir, opt_dir, angle_opt_dir, out / "networks"):
        folder.mkdir(parents=True, exist_ok=True)

    approx_rows: list[dict] = []
    seconds["approximation"] = _timed(lambda: approx_rows.extend(
        approximation.sweep(settings.approx_dims, POWERS_OF_TWO, settings.approx_samples, out_dir=approx_dir)))
    plot_approximation([r for r in approx_rows if int(r["n"]) == 64], approx_dir / "approximation.png")

    angle_rows: list[dict] = []
    seconds["angles"] = _timed(lambda: angle_rows.extend(approximation.sweep(
        [64], [4, 16, 64], settings.angle_samples, sampler="angle", angles=ANGLES, out_dir=angle_dir)))
    plot_approximation([r for r in angle_rows if r["method"] in ("frog", "mean")], angle_dir / "approximation.png")

    def optimize(folder: Path, runs: list[optimization.Run]) -> list[dict]:
        for function in dict.fromkeys(run.function for run in runs):
            selected = [run for run in runs if run.function == function]
            for _ in optimization.run_all(selected, folder, engine=engine, steps=settings.steps.get(function)):
                pass
        summary = optimization.summarize(read_csv(folder / "optimization.csv")[1])
        write_csv(folder / "optimization_summary.csv", optimization.SUMMARY_COLUMNS, summary)
        return summary

    runs = optimization.plan_runs(list(FUNCTIONS), settings.opt_dims, settings.opt_tangents,
                                  ["bp", "fg-mean", "frog"], settings.opt_seeds)
    opt_summary: list[dict] = []
    seconds["optimization"] = _timed(lambda: opt_summary.extend(optimize(opt_dir, runs)))
    plot_optimization(opt_summary, opt_dir / "optimization.png")

    angle_runs = optimization.plan_runs(["styblinski-tang"], [64], [16, 64], ["fg-mean", "frog"],
                                        settings.angle_seeds, angles=ANGLES)
    angle_summary: list[dict] = []
    seconds["angle_optimization"] = _timed(lambda: angle_summary.extend(optimize(angle_opt_dir, angle_runs)))

    network_rows: list[dict] = []

    skipped: list[str] = []

    def networks() -> None:
        for runs in settings.networks:
            try:
                network_rows.extend(run_networks(runs, out / "networks"))
            except MissingData as error:
                skipped.append(f"Skipped the network runs on {', '.join(runs.datasets)}: {error}")
                print(skipped[-1])
        write_csv(out / "networks" / "summary.csv", SUMMARY_COLUMNS, network_rows)

    if settings.networks:
        seconds["networks"] = _timed(networks)
    note = " ".join([settings.note, *skipped])
    return write_report(out, settings.name, note, approx_rows, angle_rows, opt_summary, angle_summary,
                        network_rows, seconds)

