"""Learning-rate search on Optuna (``frog tune``): one study per setting, TPE over log10(lr), pruning.

A setting is what one step size is for: (function, n, method, k) for closed-form functions and
(model, dataset, method, k) for networks, with the strategy (``--optimizer``). Each setting gets an
Optuna study in one storage (SQLite in the output folder unless ``storage`` names another database):

- **search**: TPE over lr on a log scale within [lo, hi]; proposals depend only on (seed, setting,
  worker, trial number) and the study's history, so one worker with the same seed repeats a tune
  exactly;
- **objective** (minimized): the best value of the function (mean over seeds) or the best
  validation loss of the network; a run that diverges is a failed trial: no objective, never the
  best, ``diverged`` in trials.csv (Optuna keeps it as pruned, so TPE learns to avoid its lr);
- **pruning**: the running best is reported at checkpoints (10 per seed for functions, each epoch
  for networks); Optuna's median rule stops a trial that is worse than the median of earlier trials
  at the same checkpoint;
- **resume**: trials count toward N when complete, pruned or diverged. A rerun continues to N and
  never reruns a finished trial; a trial whose process died (same host: its pid is gone; another
  host: no heartbeat for 3 minutes) is failed and its lr is run again (a network run resumes from
  its checkpoint).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import socket
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..tangents import derive_seed
from ..training.results import Row, read_csv, write_csv
from ..training.train import TrainConfig

# trials.csv / lrs.csv columns that name a setting, per kind
SETTING_COLUMNS = {
    "optimize": ["function", "n", "gradient_approach", "k", "strategy", "angle"],
    "train": ["model", "dataset", "gradient_approach", "k", "strategy"],
}
TRIAL_COLUMNS = ["number", "lr", "value", "state", "last_checkpoint", "last_value", "seconds", "worker",
                 "retry_of"]
CHECKPOINTS_PER_SEED = 10  # intermediate values reported per seed of a closed-form run
WARMUP = {"optimize": 3, "train": 0}  # the median rule may prune from this reported step on (steps from 1)
FALLBACK_GUESS = 1e-2  # centre of the default range of plain SGD where the paper has no step size
HEARTBEAT_S, GRACE_S = 60, 180


@dataclass(frozen=True)
class Setting:
    """One study: ``key`` names the step size (the table columns), ``options`` is everything else
    the objective depends on (steps, seeds, engine, epochs, ...), ``guess`` centres the default range."""

    kind: str
    key: dict[str, Any]
    options: dict[str, Any]
    guess: float

    @property
    def name(self) -> str:
        return self.kind + "".join(f" {c}={v}" for c, v in self.key.items() if v is not None or c == "k")


@dataclass(frozen=True)
class TuneJob:
    """Everything a worker needs (picklable: workers are separate processes)."""

    settings: tuple[Setting, ...]
    trials: int
    out_dir: Path
    storage: str
    seed: int = 0
    workers: int = 1
    lr_range: tuple[float, float] | None = None
    data_dir: str | None = None

    def range_of(self, setting: Setting) -> tuple[float, float]:
        """``lr_range`` or 4 decades around the setting's guess: [guess / 100, guess * 100]."""
        return self.lr_range or (setting.guess / 100, setting.guess * 100)


class Diverged(Exception):
    """The run's value became NaN or infinite: the trial fails."""


def check_options(trials: int, lr_range: Sequence[float] | None, workers: int) -> None:
    """ValueError for a trial count, lr range or worker count that cannot work."""
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    if lr_range is not None:
        lo, hi = lr_range
        if not (lo > 0 and math.isfinite(hi) and lo < hi):
            raise ValueError(f"--lr-range LO HI needs 0 < LO < HI (a non-empty range), got {lo:g} {hi:g}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")


_storages: dict[str, optuna.storages.RDBStorage] = {}


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The Optuna RDB storage at ``url`` (with heartbeats; one per process); ValueError if it
    cannot be reached."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # frog logs each trial itself
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if url not in _storages:
        try:
            _storages[url] = optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
                heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, heartbeat_stale_trial_callback=_retry,
            )
        except Exception as error:  # noqa: BLE001 - any driver or connection error: one line naming the URL
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"cannot open the storage {url}: {reason}") from None
    return _storages[url]


def prepare(job: TuneJob) -> None:
    """Create (or check) every setting's study before the workers start.

    A study that exists already must have been made with the same options and lr range; a different
    one would mix two objectives, so that is a ValueError naming the difference."""
    storage = open_storage(job.storage)
    for setting in job.settings:
        study = optuna.create_study(storage=storage, study_name=setting.name, direction="minimize",
                                    load_if_exists=True)
        wanted = {"kind": setting.kind, "key": setting.key, "options": setting.options,
                  "lr_range": list(job.range_of(setting))}
        wanted = json.loads(json.dumps(wanted))  # as stored
        saved = study.user_attrs.get("setting")
        if saved is None:
            study.set_user_attr("setting", wanted)
        elif saved != wanted:
            diff = [f"{c}: {saved[c]} before, {wanted[c]} now" for c in ("options", "lr_range") if saved[c] != wanted[c]]
            raise ValueError(f"the study '{setting.name}' in {job.storage} was tuned with other settings "
                             f"({'; '.join(diff)}); use another --out or --storage")


def run(job: TuneJob, log: Callable[[str], None] = print) -> list[Row]:
    """Tune every setting of ``job`` to ``job.trials`` trials with ``job.workers`` processes and write
    the outputs; returns the rows of lrs.csv."""
    prepare(job)
    if job.workers == 1:
        work(job, 0, log)
    else:
        context = multiprocessing.get_context("spawn")
        processes = [context.Process(target=work, args=(job, w, _flushed_print)) for w in range(job.workers)]
        for p in processes:
            p.start()
        for p in processes:
            p.join()
        failed = [w for w, p in enumerate(processes) if p.exitcode != 0]
        if failed:
            raise ValueError(f"tune worker(s) {failed} stopped with an error (see above); rerun to resume")
    return write_outputs(job, plot=True)


def work(job: TuneJob, worker: int, log: Callable[[str], None] = print) -> None:
    """One worker: for each setting in turn, run trials until the study has ``job.trials``."""
    if job.workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.workers))
    storage = open_storage(job.storage)
    for setting in job.settings:
        study = optuna.load_study(study_name=setting.name, storage=storage,
                                  pruner=optuna.pruners.MedianPruner(n_startup_trials=5,
                                                                     n_warmup_steps=WARMUP[setting.kind]))
        lo, hi = job.range_of(setting)
        while True:
            _fail_dead_trials(study)
            trials = study.get_trials(deepcopy=False)
            done = sum(_counts(t) for t in trials)
            # a running trial counts once it names its process; one killed before that (a few
            # milliseconds after it began) is failed by its missing heartbeat after GRACE_S
            running = sum(t.state == TrialState.RUNNING and "pid" in t.user_attrs for t in trials)
            if done + running >= job.trials:
                break
            study.sampler = optuna.samplers.TPESampler(  # each study its own stream of proposals
                seed=derive_seed(job.seed, zlib.crc32(setting.name.encode()), worker, len(trials)) % 2**32,
                n_startup_trials=max(3, min(10, job.trials // 4)))
            study.optimize(_trial_function(job, setting, lo, hi, worker, log), n_trials=1, catch=())
            write_outputs(job, only=setting)


def _trial_function(job: TuneJob, setting: Setting, lo: float, hi: float, worker: int, log):
    def run_trial(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", lo, hi, log=True)
        for name, value in {"host": socket.gethostname(), "pid": os.getpid(), "worker": worker}.items():
            trial.set_user_attr(name, value)
        start = time.perf_counter()

        def report(checkpoint: int, value: float) -> None:
            if math.isfinite(value):
                trial.report(value, checkpoint)
                if trial.should_prune():
                    raise optuna.TrialPruned()

        outcome = "pruned"
        try:
            value = OBJECTIVES[setting.kind](job, setting, lr, report, trial)
            outcome = f"value {value:.6g}"
            return value
        except Diverged:
            trial.set_user_attr("diverged", True)
            outcome = "diverged"
            raise optuna.TrialPruned() from None  # kept as pruned: TPE then ranks it below every complete trial
        except KeyboardInterrupt:  # Optuna fails the trial; its lr runs again on the rerun
            outcome = "interrupted"
            _retry(trial.study, trial)
            raise
        finally:
            trial.set_user_attr("seconds", time.perf_counter() - start)
            log(f"{setting.name}: trial {trial.number} lr {lr:.4g}: {outcome} ({time.perf_counter() - start:.1f} s)")

    return run_trial


def _counts(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts toward N: complete, pruned or diverged (not killed nor errored)."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED)


def status(trial: optuna.trial.FrozenTrial) -> str:
    """complete, pruned, diverged (a failed run: no objective), failed (killed or an error), running."""
    if trial.state == TrialState.PRUNED and trial.user_attrs.get("diverged"):
        return "diverged"
    return {TrialState.FAIL: "failed"}.get(trial.state, trial.state.name.lower())


def _retry(study: optuna.Study, trial: optuna.trial.FrozenTrial | optuna.Trial) -> None:
    """Run a killed or interrupted trial's lr again (Optuna calls this for trials whose heartbeat
    stopped); the new trial records which one it retries (its network run resumes from there)."""
    origin = trial.user_attrs.get("retry_of", trial.number)
    study.enqueue_trial(trial.params, user_attrs={"retry_of": origin})


def _fail_dead_trials(study: optuna.Study) -> None:
    """Fail the running trials of this host whose process is gone, and enqueue their lr again."""
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if trial.user_attrs.get("host") != host or pid is None or _alive(int(pid)):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker got there first
        _retry(study, trial)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _flushed_print(message: str) -> None:
    print(message, flush=True)


# -- outputs ---------------------------------------------------------------------------------------
def trial_rows(job: TuneJob, setting: Setting) -> list[Row]:
    """One row per trial of the setting's study (trials.csv)."""
    study = optuna.load_study(study_name=setting.name, storage=open_storage(job.storage))
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        value = t.value if t.state == TrialState.COMPLETE else None  # Optuna gives pruned ones their last value
        rows.append({**setting.key, "number": t.number, "lr": t.params.get("lr"), "value": value,
                     "state": status(t),
                     "last_checkpoint": t.last_step,
                     "last_value": t.intermediate_values.get(t.last_step) if t.last_step is not None else None,
                     "seconds": t.user_attrs.get("seconds"),
                     "worker": t.user_attrs.get("worker"), "retry_of": t.user_attrs.get("retry_of")})
    return rows


TIE = 1e-9  # relative: complete trials within this of the best value reached the same best


def best_row(rows: Sequence[Row]) -> Row | None:
    """The lrs.csv row of a setting's trials, None if none completed.

    Its lr is the best complete trial's; when several reach the best value (within TIE relative, as
    on the sphere, where a wide range of lr converges to 0), the median lr of those (lower median):
    the middle of the plateau, away from both divergence and slow progress."""
    complete = [r for r in rows if r["state"] == "complete"]
    if not complete:
        return None
    best = min(float(r["value"]) for r in complete)
    ties = sorted((r for r in complete if float(r["value"]) <= best + TIE * max(1.0, abs(best))),
                  key=lambda r: float(r["lr"]))
    chosen = ties[(len(ties) - 1) // 2]
    done = sum(r["state"] in ("complete", "pruned", "diverged") for r in rows)
    return {**chosen, "objective": chosen["value"], "trials": done, "ties": len(ties)}


_cache: dict[tuple[str, str], list[Row]] = {}  # (storage, study) -> trial rows


def stored_settings(job: TuneJob) -> list[Setting]:
    """The settings of every study of this kind in the storage (earlier calls' too), oldest first."""
    kind = job.settings[0].kind
    settings = []
    for summary in optuna.get_all_study_summaries(open_storage(job.storage), include_best_trial=False):
        saved = summary.user_attrs.get("setting")
        if saved is not None and saved["kind"] == kind:
            settings.append(Setting(kind, saved["key"], saved["options"], 0.0))
    return settings


def write_outputs(job: TuneJob, only: Setting | None = None, plot: bool = False) -> list[Row]:
    """Rewrite trials.csv and lrs.csv (and tune.png when ``plot``) from the storage: every study of
    this kind in it, so several calls into one folder build one table.

    ``only``: reload just that setting's trials (after each trial); the others come from the last
    full load. Files are replaced atomically, so several workers may write them."""
    settings = [only] if only is not None and (job.storage, only.name) in _cache else stored_settings(job)
    for setting in settings:
        _cache[(job.storage, setting.name)] = trial_rows(job, setting)
    names = [name for storage, name in _cache if storage == job.storage]
    kind = job.settings[0].kind
    columns = SETTING_COLUMNS[kind]
    table_columns = [*columns[:4], "lr", *columns[4:], "objective", "trials", "ties"]
    trials = [row for name in names for row in _cache[(job.storage, name)]]
    best = [b for name in names if (b := best_row(_cache[(job.storage, name)])) is not None]
    _atomic(job.out_dir / "trials.csv", lambda p: write_csv(p, [*columns, *TRIAL_COLUMNS], trials))
    _atomic(job.out_dir / "lrs.csv", lambda p: write_csv(p, table_columns, best))
    if plot:
        from ..training.plots import plot_tune

        _atomic(job.out_dir / "tune.png", lambda p: plot_tune({n: _cache[(job.storage, n)] for n in names}, p))
    return best


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    partial = path.with_name(f".{path.stem}-{os.getpid()}{path.suffix}")
    write(partial)
    partial.replace(path)


def default_storage(out_dir: Path) -> str:
    """SQLite in the output folder."""
    return f"sqlite:///{(Path(out_dir) / 'tune.db').resolve()}"


def run_dir(out_dir: Path, setting: Setting, trial: optuna.Trial) -> Path:
    """Folder of a trial's network run: by the trial it retries, so a retried run resumes."""
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", setting.name)
    return Path(out_dir) / "runs" / slug / f"trial-{trial.user_attrs.get('retry_of', trial.number)}"


# -- settings and objectives -----------------------------------------------------------------------
def optimize_settings(
    functions: Sequence[str], dims: Sequence[int], tangents: Sequence[int], methods: Sequence[str], *,
    seeds: Sequence[int], steps: int | None, engine: str, optimizer: str, angles: Sequence[float] | None,
) -> list[Setting]:
    """One setting per (function, n, method, k, angle), as ``frog optimize`` would run them."""
    from .optimization import plan_runs, step_size

    settings = []
    for run in plan_runs(functions, dims, tangents, methods, [0], 1.0, angles, optimizer=optimizer):
        try:
            guess = step_size(run.function, run.n, run.method, run.k, run.angle, optimizer=optimizer)
        except ValueError:
            guess = FALLBACK_GUESS
        key = {"function": run.function, "n": run.n, "gradient_approach": run.method, "k": run.k,
               "strategy": optimizer, "angle": run.angle}
        settings.append(Setting("optimize", key, {"seeds": list(seeds), "steps": steps, "engine": engine}, guess))
    return settings


def train_settings(base: TrainConfig, widths: Sequence[int], methods: Sequence[str], tangents: Sequence[int]) -> list[Setting]:
    """One setting per (width, method, k) of the network ``base`` describes (bp once per width)."""
    from ..training.lrs import model_row_name, network_lr, variant_lr
    from ..training.strategies import DEFAULT_LR

    settings = []
    for width in widths:
        for method in methods:
            for k in [None] if method == "bp" else tangents:
                config = replace(base, width=width, gradient=method, num_tangents=k or 1, lr=None, lr_table=None)
                config.check()
                try:
                    table = partial(variant_lr, variant=config.variant) if config.variant else network_lr
                    guess = (table(config.model, width, config.dataset, method, k)[0]
                             if config.optimizer == "sgd" else DEFAULT_LR[config.optimizer])
                except ValueError:
                    guess = FALLBACK_GUESS
                key = {"model": model_row_name(config.model, width), "dataset": config.dataset,
                       "gradient_approach": method, "k": k, "strategy": config.optimizer}
                options = {c: v for c, v in asdict(config).items() if c not in ("lr", "lr_table", "data_dir",
                                                                                "tangent_budget_mb")}
                settings.append(Setting("train", key, options, guess))
    return settings


def optimize_objective(job: TuneJob, setting: Setting, lr: float, report, trial) -> float:
    """Mean over the seeds of the best value of the run (:func:`frog.experiments.optimization.descend`)."""
    from ..training.functions import get_function
    from .optimization import Run, descend

    key, options = setting.key, setting.options
    steps = options["steps"] or get_function(key["function"]).steps
    every = max(1, steps // CHECKPOINTS_PER_SEED)
    bests = []
    for i, seed in enumerate(options["seeds"]):
        run = Run(key["function"], key["n"], key["gradient_approach"], key["k"], seed, lr, key["angle"], key["strategy"])

        def on_step(t: int, best: float, i: int = i) -> None:
            if (t + 1) % every == 0:
                report(i * CHECKPOINTS_PER_SEED + (t + 1) // every, best)

        result = descend(run, engine=options["engine"], steps=options["steps"], on_step=on_step)
        if result.diverged:
            raise Diverged()
        bests.append(result.best_value)
    return sum(bests) / len(bests)


_datasets: dict[tuple[str, str | None], Any] = {}


def train_objective(job: TuneJob, setting: Setting, lr: float, report, trial) -> float:
    """Best validation loss of a training run at ``lr`` (:func:`frog.training.train.train`, resumable)."""
    from ..training.data import load_dataset
    from ..training.train import train

    config = TrainConfig(**setting.options, lr=lr, data_dir=job.data_dir)
    where = (config.dataset, config.data_dir)
    if where not in _datasets:
        _datasets[where] = load_dataset(config.dataset, config.data_dir)
    out = run_dir(job.out_dir, setting, trial)
    if (out / "checkpoint.pt").exists():  # a retried trial: report the epochs it already has
        for row in read_csv(out / "metrics.csv")[1]:
            report(int(row["epoch"]), float(row["val_loss"]))
    try:
        rows = train(config, out, resume=True, progress=False, log=lambda message: None, data=_datasets[where],
                     on_epoch=lambda row: report(int(row["epoch"]), float(row["val_loss"])))
    except optuna.TrialPruned:
        (out / "checkpoint.pt").unlink(missing_ok=True)
        raise
    (out / "checkpoint.pt").unlink(missing_ok=True)  # the trial is over: keep metrics.csv and config.json
    losses = [float(r["val_loss"]) for r in rows]
    if any(r["diverged"] == "true" for r in rows) or not all(math.isfinite(v) for v in losses):
        raise Diverged()
    return min(losses)


OBJECTIVES = {"optimize": optimize_objective, "train": train_objective}
