"""Training networks with backprop, forward gradients or local learning (the paper's protocol: docs/reproducing.md).

Cross-entropy, plain SGD at a constant step size (no momentum, no weight decay), early stopping on
the validation loss. Every epoch appends a row to ``metrics.csv`` and then writes ``checkpoint.pt``;
``resume=True`` continues from the checkpoint with the same numbers as an uninterrupted run (the
data order of epoch e and the tangents of step t depend only on the seed, e and t; the global torch
random state is restored too). Checkpoints hold tensors and plain values only and are read with
``weights_only=True`` (:mod:`frog.training.checkpoints`): a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..activity import stacks_opened
from ..activity_perturbation import ActivityPerturbation
from ..checks import check_choice, check_int, check_positive
from ..distributed import Communicator
from ..engines import DEFAULT_TANGENT_BUDGET_MB
from ..errors import CheckpointError, NonFiniteError
from ..guesses import Combined, GuessSource, LocalHeads, SplitGuesses, TopDown
from ..interface import PER_SAMPLE, GradientEstimator
from ..local import LocalLearning
from ..mezo import MeZO
from ..tangents import STRUCTURED, check_rank, derive_seed
from . import checkpoints
from .data import DATASETS, Dataset, Split, batches, load_dataset
from .lrs import model_row_name, network_lr, table_lr, variant_lr
from .methods import check_method_name, estimator_for
from .models import MODELS, make_model
from .results import CsvLog, Row, read_csv, write_csv
from .strategies import (
    DEFAULT_LR,
    check_lr_schedule,
    check_strategy,
    extra_forward_passes,
    make_optimizer,
    module_loss_at,
    set_scheduled_lr,
    take_step,
)

METRICS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy",
           "seconds", "lr", "steps", "diverged", "comm_bytes_per_step", "extra_forward_passes_per_step"]


RESUMABLE_CHANGES = ("tangent_budget_mb",)  # may differ on resume: memory use, not the numbers
TRAIN_SAMPLERS = ("normal", "rademacher", *STRUCTURED)
# local: LocalHeads, auxiliary heads on hidden blocks and the loss's own gradient on the last; topdown: TopDown,
# the gradient at the last block's input for the blocks of that shape (a residual stream), heads elsewhere;
# topdown1: the same with the first-order terms of the blocks above; X+local: both guesses on the stream's
# blocks (Combined), heads elsewhere
GUESSES = ("local", "topdown", "topdown1", "topdown+local", "topdown1+local")
RENAMED = {"tangents": "num_tangents"}  # config.json keys of older frog versions


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (written to config.json)."""

    model: str = "fc"
    width: int = 1024
    depth: int = 2
    split_stacks: bool = False
    dataset: str = "digits"
    data_dir: str | None = None
    gradient: str = "frog"
    num_tangents: int = 16
    engine: str = "jvp"
    perturbation: str = "activity"
    sampler: str = "normal"
    rank: int = 1
    lr: float | None = None
    epochs: int = 200
    patience: int = 10
    batch_size: int | None = None
    seed: int = 0
    device: str = "cpu"
    tangent_budget_mb: float = DEFAULT_TANGENT_BUDGET_MB
    optimizer: str = "sgd"
    lr_table: str | None = None
    lr_schedule: str = "constant"
    guess: str | None = None
    per_example_tangents: bool = False
    block_local: bool = False
    local_weight: float = 0.0
    guess_pieces: int = 1
    head_lr: float = 0.1
    head_channels: int = 0
    head_tokens: str = "mean"
    mezo_eps: float = 1e-3

    @property
    def variant(self) -> str:
        """The activity tangents beyond the paper's ("guess", "per-example", "guess+per-example"), or ""."""
        return "+".join(name for name, on in (("guess", self.guess), ("per-example", self.per_example_tangents)) if on)

    @property
    def shapes_activity_tangents(self) -> bool:
        """Whether a setting beyond the paper's shapes the activity tangents (guesses, per example, ...)."""
        return bool(self.variant or self.block_local or self.local_weight)

    def _check_flags_used(self) -> None:
        """ValueError naming the flags that the chosen gradient would silently ignore."""
        activity_only = ["--per-example-tangents", "--block-local-tangents", "--local-weight"]
        ignored = {
            "bp": ["--guess", "--split-stacks", *activity_only],
            "mezo": ["--sampler", "--guess", "--split-stacks", *activity_only],
            "local": ["--perturbation weight", "--sampler", *activity_only],
        }.get(self.gradient, ["--split-stacks", "--guess", *activity_only] if self.perturbation == "weight" else [])
        if self.guess_pieces != 1 and (self.guess is None or self.gradient == "local"):
            raise ValueError("--guess-pieces cuts the guesses into tangents: use it with --guess and a forward gradient")
        given = {"--guess": self.guess is not None, "--per-example-tangents": self.per_example_tangents,
                 "--split-stacks": self.split_stacks, "--block-local-tangents": self.block_local,
                 "--local-weight": bool(self.local_weight), "--sampler": self.sampler != "normal",
                 "--perturbation weight": self.perturbation == "weight"}
        unused = [flag for flag in ignored if given[flag]]
        if unused:
            what = f"--gradient {self.gradient}" if self.gradient in ("bp", "mezo", "local") else "--perturbation weight"
            raise ValueError(f"{what} does not use {', '.join(unused)}: drop {'it' if len(unused) == 1 else 'them'}")

    def check(self) -> None:
        """ValueError for any setting that cannot work, naming it. The estimator's own settings are checked
        by building it (its constructor's checks); what is left are the run's settings and the combinations
        that an estimator would silently ignore."""
        check_choice("model", self.model, MODELS)
        check_choice("dataset", self.dataset, DATASETS)
        check_method_name(self.gradient)
        check_choice("sampler", self.sampler, TRAIN_SAMPLERS)
        if self.guess is not None:
            check_choice("guess", self.guess, GUESSES)
        for name in ("epochs", "width", "depth", "patience", "guess_pieces"):
            check_int(name, getattr(self, name), 1)
        check_int("batch size", self.batch_size, 1, optional=True)
        check_strategy(self.optimizer)
        check_lr_schedule(self.lr_schedule)
        if self.lr_schedule != "constant" and self.optimizer == "line-search":
            raise ValueError("--optimizer line-search picks its own step sizes: drop --lr-schedule")
        self._check_flags_used()
        if self.gradient == "mezo" and self.optimizer == "sgd" and self.lr is None and self.lr_table is None:
            raise ValueError("--gradient mezo has no step-size table: give --lr (MeZO's SGD step sizes are about "
                             "1/n-scaled: 1e-7..1e-5 for OPT-13B; see benchmarks/studies/finetune.py for a scaled grid)")
        if self.lr is not None and self.lr_table is not None:
            raise ValueError("give --lr or --lr-table, not both")
        if self.lr is not None:
            check_positive("the learning rate", self.lr)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        build_estimator(self, num_classes=2)  # the estimator's own checks


def build_estimator(config: TrainConfig, num_classes: int, blocks: Sequence[nn.Module] | None = None,
                    communicator: Communicator | None = None) -> GradientEstimator | None:
    """The estimator of a run (None for backprop), with the paper's plain estimators (no length
    correction). Activity perturbation gets its guesses, per-example or block-local tangents and hybrid
    weight; local learning its guess source (local heads unless --guess says otherwise)."""
    if config.gradient == "bp":
        return None
    guess = guess_source(config, num_classes)
    if config.gradient == "local":
        assert guess is not None  # local learning always has one
        return LocalLearning(guess, blocks=blocks)
    if config.gradient == "mezo":
        return MeZO(eps=config.mezo_eps, directions=config.num_tangents, seed=config.seed)
    perturbation: str | ActivityPerturbation = config.perturbation
    if config.perturbation == "activity" and (config.shapes_activity_tangents or blocks is not None):
        perturbation = ActivityPerturbation(blocks, per_example=config.per_example_tangents, guess=guess,
                                            block_local=config.block_local, local_weight=config.local_weight)
    return estimator_for(config.gradient, config.num_tangents, engine=config.engine, seed=config.seed,
                         perturbation=perturbation, communicator=communicator, sampler=config.sampler,
                         rank=config.rank, tangent_budget_mb=config.tangent_budget_mb,
                         scale_correction=False)  # the paper's plain estimators


def guess_source(config: TrainConfig, num_classes: int) -> GuessSource | None:
    """The guess source of --guess (local learning: local heads by default), or None."""
    if config.guess is None and config.gradient != "local":
        return None
    heads = LocalHeads(num_classes, lr=config.head_lr, seed=config.seed, hidden_channels=config.head_channels,
                       tokens=config.head_tokens)
    source: GuessSource = heads
    if config.guess not in (None, "local"):
        top, _, with_heads = config.guess.partition("+")
        order = 1 if top == "topdown1" else 0
        source = Combined(TopDown(order=order), heads) if with_heads else TopDown(heads, order=order)
    return SplitGuesses(source, config.guess_pieces) if config.guess_pieces > 1 else source


def resolve(config: TrainConfig) -> tuple[TrainConfig, str]:
    """The config with lr and batch size filled in, and a note on where the lr came from: given,
    ``lr_table``, the paper's table (sgd) or the strategy's default."""
    note = "learning rate given"
    lr = config.lr
    if lr is None and config.lr_table is not None:
        k = None if config.gradient == "bp" else config.num_tangents
        lr = table_lr(config.lr_table, config.optimizer, model=model_row_name(config.model, config.width),
                      dataset=config.dataset, gradient_approach=config.gradient, k=k)
        note = f"table {config.lr_table}"
    elif lr is None and config.optimizer == "sgd" and (config.depth != 2 or config.model == "resmlp"):
        raise ValueError(f"the step-size tables have no row for --model {config.model} --depth {config.depth}: "
                         "give --lr (or tune it: frog tune train)")
    elif lr is None and config.optimizer == "sgd" and (config.variant or config.gradient == "local"):
        lr, note = variant_lr(config.model, config.width, config.dataset, config.gradient, config.num_tangents,
                              config.variant or "guess")
    elif lr is None and config.optimizer == "sgd":
        lr, note = network_lr(config.model, config.width, config.dataset, config.gradient, config.num_tangents)
    elif lr is None:
        lr, note = DEFAULT_LR[config.optimizer], f"default of --optimizer {config.optimizer}"
    batch_size = config.batch_size or (128 if config.dataset == "cifar10" else 64)
    return TrainConfig(**{**asdict(config), "lr": lr, "batch_size": batch_size}), note


def evaluate(model: nn.Module, split: Split, batch_size: int, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode, no gradients) on a split."""
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in batches(split, max(batch_size, 256), shuffle=False, device=device):
            logits = model(x)
            total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    model.train()
    return total_loss / len(split), correct / len(split)


def _train_step(model, optimizer, estimator: GradientEstimator | None, x, y, comm: Communicator | None = None):
    """One optimizer step; returns the batch's summed loss and number of correct predictions.

    In distributed data mode (x, y) is this rank's shard; backprop then all-reduces its gradients."""
    if estimator is None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"the loss became {loss.item()}; use a smaller learning rate")
        loss.backward()
        loss = loss.detach()
        if comm is not None:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad = comm.all_reduce_mean(p.grad)
    else:
        captured: list[torch.Tensor] = []

        def losses(m: nn.Module) -> torch.Tensor:
            logits = m(x)
            if not captured and _plain(logits):  # the first plain (untransformed) pass
                captured.append(logits.detach())
            per_sample = nn.functional.cross_entropy(logits, y, reduction="none")
            return per_sample if estimator.loss_contract == PER_SAMPLE else per_sample.mean()

        loss = estimator.fill_grad(model, losses, targets=y)
        logits = captured[0] if captured else model(x).detach()
    take_step(optimizer, module_loss_at(model, (x,), lambda out: nn.functional.cross_entropy(out, y)))
    return loss.item() * len(y), int((logits.argmax(1) == y).sum())


@dataclass
class _Run:
    """What one run works with: its resolved config and where its step size came from, where it writes, the model, optimizer and estimator,
    and the loop state (the last finished epoch, the best validation loss, epochs without improvement,
    whether it is done) that the checkpoint keeps."""

    config: TrainConfig
    lr_note: str
    out_dir: Path
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    estimator: GradientEstimator | None
    main_rank: bool
    log: Callable[[str], None]
    state: dict[str, Any]
    metrics: CsvLog | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.csv"

    @property
    def config_path(self) -> Path:
        return self.out_dir / "config.json"


def train(
    config: TrainConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log=print,
    data: Dataset | None = None,
    communicator: Communicator | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> list[Row]:
    """Train as configured, writing ``config.json``, ``metrics.csv`` and ``checkpoint.pt`` into
    ``out_dir``; returns the metric rows. ``data`` overrides loading the configured dataset.
    ``on_epoch(row)`` is called after each epoch's row and checkpoint are written (it may raise to stop).

    With a ``communicator`` (:mod:`frog.distributed`) every rank runs this function; the batch size
    stays the global batch, so the numbers do not depend on the number of ranks, and only rank 0
    writes files."""
    comm = communicator
    _checked(config, comm)
    data = data or load_dataset(config.dataset, config.data_dir, split_seed=0)
    run = _setup(config, Path(out_dir), data, comm, log if comm is None or comm.rank == 0 else _silent, resume)
    _resume(run, resume, comm)
    diverged = False  # in the last epoch run here (resuming a finished run runs none)
    while not run.state["done"] and run.state["epoch"] < run.config.epochs:
        row, diverged = _epoch(run, data, comm, progress)
        _save(run, row)
        if on_epoch is not None:
            on_epoch(row)
    if run.state["done"] and not diverged and run.state["bad_epochs"] >= run.config.patience:
        run.log(f"early stop: no validation improvement for {run.config.patience} epochs")
    if comm is not None:
        comm.barrier()  # rank 0's files are complete before anyone returns
    return read_csv(run.metrics_path)[1]


def _checked(config: TrainConfig, comm: Communicator | None) -> None:
    """ValueError for a config that cannot work, alone or over the ranks of ``comm``."""
    config.check()
    if comm is not None and config.gradient in ("mezo", "local"):
        raise ValueError(f"--gradient {config.gradient} runs on one process: drop --distributed")
    if comm is not None and comm.mode == "tangent" and config.gradient == "bp":
        raise ValueError("--distributed tangent splits the tangents: use a forward-gradient method, or --distributed data")
    if comm is not None and config.optimizer == "line-search":
        raise ValueError("--optimizer line-search runs on one process (its trial passes are not shared); "
                         "drop --distributed or use another --optimizer")


def _setup(config: TrainConfig, out_dir: Path, data: Dataset, comm: Communicator | None, log: Callable[[str], None],
           resume: bool) -> _Run:
    """Resolve the config (step size, batch size) and build the model, the optimizer and the estimator."""
    config, lr_note = resolve(config)
    log(f"learning rate {config.lr:g} ({lr_note}), batch size {config.batch_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    model = make_model(config.model, data.input_shape, data.num_classes, width=config.width,
                       depth=config.depth).to(device)
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr)
    blocks = stacks_opened(model) if config.split_stacks else None
    estimator = build_estimator(config, data.num_classes, blocks, comm)
    trainable = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    check_rank(config.sampler, config.rank, list(trainable.values()), list(trainable))  # before any work
    state: dict[str, Any] = {"epoch": 0, "best_val": math.inf, "bad_epochs": 0, "done": False}
    if comm is not None:
        comm.check_same(**asdict(config), resume=resume, world=comm.world)
        if comm.mode == "data" and config.perturbation == "activity" and estimator is not None:
            log("distributed data mode with activity perturbation: the weight gradients depend on every "
                "sample, so the ranks all-reduce gradients (n numbers a step), not k jvps")
    return _Run(config, lr_note, out_dir, device, model, optimizer, estimator, comm is None or comm.rank == 0, log, state)


def _resume(run: _Run, resume: bool, comm: Communicator | None) -> None:
    """Continue from the checkpoint (same settings, up to those in RESUMABLE_CHANGES) or start afresh;
    then (re)write config.json and open metrics.csv."""
    resuming = resume and run.checkpoint_path.exists()
    if resuming:
        saved_config = json.loads(run.config_path.read_text())["config"]
        saved = {**asdict(TrainConfig()), **{RENAMED.get(k, k): v for k, v in saved_config.items()}}  # older runs
        current = asdict(run.config)
        for free in RESUMABLE_CHANGES:  # settings that do not change the numbers
            saved.pop(free, None), current.pop(free)
        if saved != current:
            changed = sorted(set(saved) ^ set(current) | {k for k in saved if saved[k] != current.get(k)})
            raise ValueError(f"cannot resume {run.out_dir}: settings differ from the checkpoint ({', '.join(changed)})")
        run.state = _restore(run.checkpoint_path, run.device, run.model, run.optimizer, run.estimator)
        if run.main_rank:
            _, rows = read_csv(run.metrics_path)
            write_csv(run.metrics_path, METRICS, [r for r in rows if int(r["epoch"]) <= run.state["epoch"]])
        run.log(f"resumed after epoch {run.state['epoch']}")
    elif resume:
        run.log(f"no checkpoint in {run.out_dir}: starting from scratch")
    if comm is not None:
        comm.barrier()  # every rank has read config.json and the checkpoint before rank 0 rewrites them
    if run.main_rank:
        if not resuming and run.metrics_path.exists():
            run.metrics_path.unlink()
        run.config_path.write_text(json.dumps({"config": asdict(run.config), "lr_source": run.lr_note}, indent=2))
        run.metrics = CsvLog(run.metrics_path, METRICS)
    if comm is not None:
        comm.barrier()


def _epoch(run: _Run, data: Dataset, comm: Communicator | None, progress: bool) -> tuple[dict[str, Any], bool]:
    """One epoch of training and its evaluation: the metrics row, and whether the run diverged."""
    config, state, optimizer = run.config, run.state, run.optimizer
    epoch, start = state["epoch"] + 1, time.perf_counter()
    sent_before, passes_before = (comm.bytes_sent if comm else 0), extra_forward_passes(optimizer)
    total_loss, correct, seen, step_count, diverged = _train_batches(run, data, comm, progress, epoch)
    bytes_per_step = (comm.bytes_sent - sent_before) / max(step_count, 1) if comm else None
    if comm is not None and comm.mode == "data":  # the epoch's training totals over all shards
        totals = comm.sum_over_ranks(torch.tensor([total_loss, correct, seen], dtype=torch.float64))
        total_loss, correct, seen = float(totals[0]), int(totals[1]), int(totals[2])
    assert config.batch_size is not None  # resolved in _setup
    val_loss, val_accuracy = evaluate(run.model, data.val, config.batch_size, run.device)
    test_loss, test_accuracy = evaluate(run.model, data.test, config.batch_size, run.device)
    if val_loss < state["best_val"]:
        state["best_val"], state["bad_epochs"] = val_loss, 0
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch
    state["done"] = diverged or state["bad_epochs"] >= config.patience or not math.isfinite(val_loss)
    row = {
        "epoch": epoch, "train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1),
        "val_loss": val_loss, "val_accuracy": val_accuracy, "test_loss": test_loss,
        "test_accuracy": test_accuracy, "seconds": time.perf_counter() - start, "lr": config.lr,
        "steps": run.estimator.calls if run.estimator is not None else "", "diverged": diverged,
        "comm_bytes_per_step": bytes_per_step,
        "extra_forward_passes_per_step": (extra_forward_passes(optimizer) - passes_before) / max(step_count, 1),
    }
    return row, diverged


def _train_batches(run: _Run, data: Dataset, comm: Communicator | None, progress: bool,
                   epoch: int) -> tuple[float, int, int, int, bool]:
    """The training steps of ``epoch`` (data order from the seed and the epoch; step sizes from the
    schedule): (summed loss, correct predictions, examples seen, steps taken, whether the run diverged)."""
    config = run.config
    batch_size = config.batch_size
    assert batch_size is not None and config.lr is not None  # resolved in _setup
    steps_per_epoch = math.ceil(len(data.train) / batch_size)
    generator = torch.Generator().manual_seed(derive_seed(config.seed, epoch))
    total_loss, correct, seen, step_count = 0.0, 0, 0, 0
    run.model.train()
    steps = batches(data.train, batch_size, shuffle=True, generator=generator, device=run.device)
    for index, (x, y) in enumerate(tqdm(steps, total=steps_per_epoch, desc=f"epoch {epoch}",
                                        disable=not (progress and run.main_rank), leave=False)):
        if config.lr_schedule != "constant":  # constant: the optimizer's step-size state is left alone
            set_scheduled_lr(run.optimizer, config.lr, config.lr_schedule, (epoch - 1) * steps_per_epoch + index,
                             config.epochs * steps_per_epoch)
        if comm is not None and comm.mode == "data":
            if len(y) < comm.world:
                continue  # too small to give every rank a sample (only ever a last partial batch)
            shard = comm.shard(len(y))
            comm.shard_weight = (shard.stop - shard.start) / len(y)
            x, y = x[shard], y[shard]
        try:
            loss, right = _train_step(run.model, run.optimizer, run.estimator, x, y,
                                      comm if comm and comm.mode == "data" else None)
        except NonFiniteError as error:
            run.log(f"stopped: {error}")
            return total_loss, correct, seen, step_count, True
        total_loss, correct, seen, step_count = total_loss + loss, correct + right, seen + len(y), step_count + 1
    return total_loss, correct, seen, step_count, False


def _save(run: _Run, row: dict[str, Any]) -> None:
    """Append the epoch's row to metrics.csv, then write the checkpoint (main rank), and log the row."""
    if run.main_rank:
        assert run.metrics is not None  # the main rank writes the metrics
        run.metrics.append(row)
        checkpoints.save(run.checkpoint_path, {
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "estimator": run.estimator.state_dict() if run.estimator is not None else None,
            "state": run.state, "rng": checkpoints.rng_state(run.device)})
    run.log(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
            f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f} | test acc {row['test_accuracy']:.4f} | "
            f"{row['seconds']:.1f} s")


def _silent(message: str) -> None:
    """The log of ranks other than 0."""


def _plain(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is an ordinary tensor, not one wrapped by a torch.func transform."""
    return not torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def _restore(path: Path, device: torch.device, model: nn.Module, optimizer, estimator: GradientEstimator | None
             ) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into model, optimizer, estimator and the random state; returns
    the loop state (epoch, best validation loss, epochs without improvement, done)."""
    checkpoint = checkpoints.load(path, map_location=device)
    missing = [key for key in ("model", "optimizer", "estimator", "state") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a frog training checkpoint (it lacks {', '.join(missing)}); "
                              "start the run again without --resume")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if estimator is not None:
        estimator.load_state_dict(checkpoint["estimator"])
    if checkpoint.get("rng") is not None:  # checkpoints of older frog versions have none (nothing drew from it)
        checkpoints.set_rng_state(checkpoint["rng"], device)
    return checkpoint["state"]
