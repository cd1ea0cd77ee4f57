"""Training networks with backprop or forward gradients (SPEC 2.4-2.5, "Training protocol").

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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..activity import stacks_opened
from ..distributed import Communicator
from ..engines import DEFAULT_TANGENT_BUDGET_MB, ENGINES, budget_bytes
from ..errors import CheckpointError, NonFiniteError
from ..estimator import PERTURBATIONS
from ..example_tangents import EXAMPLE_KINDS
from ..guesses import HEAD_TOKENS, GuessSource, LocalHeads, TopDown
from ..interface import PER_SAMPLE, GradientEstimator
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
# the gradient at the last block's input for the blocks of that shape (a residual stream), heads elsewhere
GUESSES = ("local", "topdown")


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
    tangents: int = 16
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
    head_lr: float = 0.1
    head_channels: int = 0
    head_tokens: str = "mean"
    mezo_eps: float = 1e-3

    @property
    def variant(self) -> str:
        """The activity tangents beyond the paper's ("guess", "per-example", "guess+per-example"), or ""."""
        return "+".join(name for name, on in (("guess", self.guess), ("per-example", self.per_example_tangents)) if on)

    def check(self) -> None:
        """ValueError for any setting that cannot work, naming it."""
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        check_method_name(self.gradient)
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {self.perturbation!r}; choose one of {', '.join(PERTURBATIONS)}")
        if self.sampler not in TRAIN_SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(TRAIN_SAMPLERS)}")
        check_rank(self.sampler, self.rank, ())
        if self.sampler in STRUCTURED and self.perturbation != "weight":
            raise ValueError(f"--sampler {self.sampler} structures weight tangents: add --perturbation weight")
        for name in ("tangents", "epochs", "width", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        budget_bytes(self.tangent_budget_mb)  # ValueError unless > 0
        check_strategy(self.optimizer)
        check_lr_schedule(self.lr_schedule)
        if self.lr_schedule != "constant" and self.optimizer == "line-search":
            raise ValueError("--optimizer line-search picks its own step sizes: drop --lr-schedule")
        if self.guess is not None and self.guess not in GUESSES:
            raise ValueError(f"unknown guess {self.guess!r}; choose one of {', '.join(GUESSES)}")
        if self.gradient == "local" and (self.perturbation != "activity" or self.per_example_tangents
                                         or self.sampler != "normal"):
            raise ValueError("--gradient local trains each block by its head's loss and draws no tangents: drop "
                             "--perturbation weight, --per-example-tangents and --sampler")
        if self.split_stacks and (self.gradient == "bp" or self.perturbation != "activity"):
            raise ValueError("--split-stacks chooses the blocks of activity perturbation and local learning: use "
                             "--gradient local or a forward gradient with --perturbation activity")
        if (self.guess is not None or self.per_example_tangents) and (
                self.gradient == "bp" or self.perturbation != "activity" or self.sampler not in EXAMPLE_KINDS):
            raise ValueError("--guess and --per-example-tangents shape activity tangents: use a forward-gradient "
                             "--gradient with --perturbation activity and --sampler normal or rademacher")
        if self.gradient == "mezo" and (self.sampler != "normal" or self.variant):
            raise ValueError("--gradient mezo draws its own N(0, 1) directions: drop --sampler, --guess and "
                             "--per-example-tangents (-k sets its directions per step)")
        if self.gradient == "mezo" and self.optimizer == "sgd" and self.lr is None and self.lr_table is None:
            raise ValueError("--gradient mezo has no step-size table: give --lr (MeZO's SGD step sizes are about "
                             "1/n-scaled: 1e-7..1e-5 for OPT-13B; see benchmarks/finetune.py for a scaled grid)")
        if not self.mezo_eps > 0:
            raise ValueError(f"--mezo-eps must be > 0, got {self.mezo_eps}")
        if self.head_tokens not in HEAD_TOKENS:
            raise ValueError(f"unknown --head-tokens {self.head_tokens!r}; choose one of {', '.join(HEAD_TOKENS)}")
        if self.head_channels < 0:
            raise ValueError(f"--head-channels must be >= 0, got {self.head_channels}")
        if not self.head_lr > 0:
            raise ValueError(f"--head-lr must be > 0, got {self.head_lr}")
        if self.lr is not None and self.lr_table is not None:
            raise ValueError("give --lr or --lr-table, not both")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"the learning rate must be > 0, got {self.lr}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu")


def example_options(config: TrainConfig, num_classes: int) -> dict[str, Any]:
    """The estimator's per-example and guess options of a run (none for the paper's protocol); local
    learning takes local heads unless --guess says otherwise."""
    if config.gradient == "bp":
        return {}
    guess: GuessSource | None = None
    if config.guess is not None or config.gradient == "local":
        guess = LocalHeads(num_classes, lr=config.head_lr, seed=config.seed, hidden_channels=config.head_channels,
                           tokens=config.head_tokens)
        if config.guess == "topdown":
            guess = TopDown(guess)
    return {"per_example": config.per_example_tangents, "guess": guess}


def resolve(config: TrainConfig) -> tuple[TrainConfig, str]:
    """The config with lr and batch size filled in, and a note on where the lr came from: given,
    ``lr_table``, the paper's table (sgd) or the strategy's default."""
    note = "learning rate given"
    lr = config.lr
    if lr is None and config.lr_table is not None:
        k = None if config.gradient == "bp" else config.tangents
        lr = table_lr(config.lr_table, config.optimizer, model=model_row_name(config.model, config.width),
                      dataset=config.dataset, gradient_approach=config.gradient, k=k)
        note = f"table {config.lr_table}"
    elif lr is None and config.optimizer == "sgd" and (config.depth != 2 or config.model == "resmlp"):
        raise ValueError(f"the step-size tables have no row for --model {config.model} --depth {config.depth}: "
                         "give --lr (or tune it: frog tune train)")
    elif lr is None and config.optimizer == "sgd" and (config.variant or config.gradient == "local"):
        lr, note = variant_lr(config.model, config.width, config.dataset, config.gradient, config.tangents,
                              config.variant or "guess")
    elif lr is None and config.optimizer == "sgd":
        lr, note = network_lr(config.model, config.width, config.dataset, config.gradient, config.tangents)
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
    main_rank = comm is None or comm.rank == 0
    if not main_rank:
        log = _silent
    config.check()
    if comm is not None and config.gradient in ("mezo", "local"):
        raise ValueError(f"--gradient {config.gradient} runs on one process: drop --distributed")
    if comm is not None and comm.mode == "tangent" and config.gradient == "bp":
        raise ValueError("--distributed tangent splits the tangents: use a forward-gradient method, or --distributed data")
    if comm is not None and config.optimizer == "line-search":
        raise ValueError("--optimizer line-search runs on one process (its trial passes are not shared); "
                         "drop --distributed or use another --optimizer")
    data = data or load_dataset(config.dataset, config.data_dir, split_seed=0)
    config, lr_note = resolve(config)
    log(f"learning rate {config.lr:g} ({lr_note}), batch size {config.batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path, metrics_path, config_path = out_dir / "checkpoint.pt", out_dir / "metrics.csv", out_dir / "config.json"
    device = torch.device(config.device)

    torch.manual_seed(config.seed)
    model = make_model(config.model, data.input_shape, data.num_classes, width=config.width,
                       depth=config.depth).to(device)
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr)
    estimator = estimator_for(config.gradient, config.tangents, engine=config.engine, seed=config.seed,
                              perturbation=config.perturbation, communicator=comm,
                              sampler=config.sampler, rank=config.rank,
                              tangent_budget_mb=config.tangent_budget_mb,
                              scale_correction=False,  # the paper's plain estimators
                              mezo_eps=config.mezo_eps,
                              blocks=stacks_opened(model) if config.split_stacks else None,
                              **example_options(config, data.num_classes))
    trainable = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    check_rank(config.sampler, config.rank, list(trainable.values()), list(trainable))  # before any work
    state: dict[str, Any] = {"epoch": 0, "best_val": math.inf, "bad_epochs": 0, "done": False}
    if comm is not None:
        comm.check_same(**asdict(config), resume=resume, world=comm.world)
        if comm.mode == "data" and config.perturbation == "activity" and estimator is not None:
            log("distributed data mode with activity perturbation: the weight gradients depend on every "
                "sample, so the ranks all-reduce gradients (n numbers a step), not k jvps")

    if resume and checkpoint_path.exists():
        saved = {**asdict(TrainConfig()), **json.loads(config_path.read_text())["config"]}  # older runs: defaults
        current = asdict(config)
        for free in RESUMABLE_CHANGES:  # settings that do not change the numbers
            saved.pop(free, None), current.pop(free)
        if saved != current:
            changed = sorted(set(saved) ^ set(current) | {k for k in saved if saved[k] != current.get(k)})
            raise ValueError(f"cannot resume {out_dir}: settings differ from the checkpoint ({', '.join(changed)})")
        state = _restore(checkpoint_path, device, model, optimizer, estimator)
        if main_rank:
            _, rows = read_csv(metrics_path)
            write_csv(metrics_path, METRICS, [r for r in rows if int(r["epoch"]) <= state["epoch"]])
        log(f"resumed after epoch {state['epoch']}")
    elif resume:
        log(f"no checkpoint in {out_dir}: starting from scratch")
    metrics = None
    if comm is not None:
        comm.barrier()  # every rank has read config.json and the checkpoint before rank 0 rewrites them
    if main_rank:
        if not (resume and checkpoint_path.exists()) and metrics_path.exists():
            metrics_path.unlink()
        config_path.write_text(json.dumps({"config": asdict(config), "lr_source": lr_note}, indent=2))
        metrics = CsvLog(metrics_path, METRICS)
    if comm is not None:
        comm.barrier()

    batch_size = config.batch_size
    assert batch_size is not None and config.lr is not None  # resolved above
    diverged = False  # in the last epoch run here (resuming a finished run runs none)
    steps_per_epoch = math.ceil(len(data.train) / batch_size)
    while not state["done"] and state["epoch"] < config.epochs:
        epoch = state["epoch"] + 1
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(derive_seed(config.seed, epoch))
        total_loss, correct, seen, diverged = 0.0, 0, 0, False
        model.train()
        steps = batches(data.train, batch_size, shuffle=True, generator=generator, device=device)
        sent_before, step_count, passes_before = (comm.bytes_sent if comm else 0), 0, extra_forward_passes(optimizer)
        for index, (x, y) in enumerate(tqdm(steps, total=steps_per_epoch, desc=f"epoch {epoch}",
                                            disable=not (progress and main_rank), leave=False)):
            if config.lr_schedule != "constant":  # constant: the optimizer's step-size state is left alone
                set_scheduled_lr(optimizer, config.lr, config.lr_schedule, (epoch - 1) * steps_per_epoch + index,
                                 config.epochs * steps_per_epoch)
            if comm is not None and comm.mode == "data":
                if len(y) < comm.world:
                    continue  # too small to give every rank a sample (only ever a last partial batch)
                shard = comm.shard(len(y))
                comm.shard_weight = (shard.stop - shard.start) / len(y)
                x, y = x[shard], y[shard]
            try:
                loss, right = _train_step(model, optimizer, estimator, x, y, comm if comm and comm.mode == "data" else None)
            except NonFiniteError as error:
                log(f"stopped: {error}")
                diverged = True
                break
            total_loss, correct, seen, step_count = total_loss + loss, correct + right, seen + len(y), step_count + 1
        bytes_per_step = (comm.bytes_sent - sent_before) / max(step_count, 1) if comm else None
        if comm is not None and comm.mode == "data":  # the epoch's training totals over all shards
            totals = comm.sum_over_ranks(torch.tensor([total_loss, correct, seen], dtype=torch.float64))
            total_loss, correct, seen = float(totals[0]), int(totals[1]), int(totals[2])
        val_loss, val_accuracy = evaluate(model, data.val, batch_size, device)
        test_loss, test_accuracy = evaluate(model, data.test, batch_size, device)
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
            "steps": estimator.calls if estimator is not None else "", "diverged": diverged,
            "comm_bytes_per_step": bytes_per_step,
            "extra_forward_passes_per_step": (extra_forward_passes(optimizer) - passes_before) / max(step_count, 1),
        }
        if main_rank:
            assert metrics is not None  # the main rank writes the metrics
            metrics.append(row)
            checkpoints.save(checkpoint_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "estimator": estimator.state_dict() if estimator is not None else None,
                "state": state, "rng": checkpoints.rng_state(device)})
        log(f"epoch {epoch}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
            f"val loss {val_loss:.4f} acc {val_accuracy:.4f} | test acc {test_accuracy:.4f} | {row['seconds']:.1f} s")
        if on_epoch is not None:
            on_epoch(row)
    if state["done"] and not diverged and state["bad_epochs"] >= config.patience:
        log(f"early stop: no validation improvement for {config.patience} epochs")
    if comm is not None:
        comm.barrier()  # rank 0's files are complete before anyone returns
    return read_csv(metrics_path)[1]


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
