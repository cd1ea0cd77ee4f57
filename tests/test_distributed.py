"""Two ranks on localhost (gloo) against one process: same parameters; mismatches and faults fail fast."""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from resume import assert_same_run, run_straight_and_resumed

import frog
from frog.distributed import Communicator, DistributedError
from frog.training.train import TrainConfig, train

CONFIG = {"model": "fc", "width": 32, "dataset": "digits", "num_tangents": 4, "lr": 0.05, "batch_size": 96, "epochs": 1}
SCENARIOS = {
    "tangent": ({"gradient": "frog", "perturbation": "activity"}, "tangent"),
    "tangent-weight": ({"gradient": "fg-mean", "perturbation": "weight"}, "tangent"),
    "tangent-lowrank": ({"gradient": "frog", "perturbation": "weight", "sampler": "lowrank", "rank": 2}, "tangent"),
    "data-weight": ({"gradient": "frog", "perturbation": "weight"}, "data"),
    "data-activity": ({"gradient": "frog", "perturbation": "activity"}, "data"),
    "data-bp": ({"gradient": "bp"}, "data"),
}


DDP_BATCH = 12
DDP_RUNS = {"weight-jvp": {"engine": "jvp"}, "weight-sim": {"engine": "sim"},
            "activity-jvp": {"engine": "jvp", "perturbation": "activity"}}


def ddp_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def ddp_steps(model: torch.nn.Module, options: dict, shard: slice) -> None:
    """Three steps of fill_grad + SGD on this shard of a fixed batch, as a DDP training loop would run."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(DDP_BATCH, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (DDP_BATCH,), generator=g)
    reduction = "none" if options.get("perturbation") == "activity" else "mean"
    estimator = frog.ForwardGradient(4, seed=3, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        estimator.fill_grad(model, lambda m: F.cross_entropy(m(x[shard]), y[shard], reduction=reduction))
        optimizer.step()


def _worker(rank: int, world: int, init_file: str, out: str, task: str) -> None:
    torch.set_num_threads(1)
    result = {"ok": True}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=4))
        if task == "runs":
            for name, (settings, mode) in SCENARIOS.items():
                train(TrainConfig(**CONFIG, **settings), Path(out) / name, progress=False, log=lambda s: None,
                      communicator=Communicator(mode))
        elif task == "resume":
            def run(config, folder, **options):
                train(config, folder, progress=False, log=lambda s: None, communicator=Communicator("tangent"), **options)

            # rank 0 marks the interrupted run as asked for 2 epochs; every rank waits for it before resuming
            run_straight_and_resumed(TrainConfig(**{**CONFIG, "epochs": 2}, gradient="frog"), Path(out), run=run,
                                     edit=rank == 0, before_resume=lambda folder: dist.barrier())
        elif task == "ddp":
            for name, options in DDP_RUNS.items():
                model = torch.nn.parallel.DistributedDataParallel(ddp_model())
                shard = slice(rank * DDP_BATCH // world, (rank + 1) * DDP_BATCH // world)
                ddp_steps(model, options, shard)
                torch.save(model.module.state_dict(), Path(out) / f"ddp-{name}-{rank}.pt")
        elif task == "mismatch":
            train(TrainConfig(**{**CONFIG, "seed": rank}, gradient="frog"), Path(out) / "mismatch", progress=False,
                  log=lambda s: None, communicator=Communicator("tangent"))
        elif task == "hang":
            if rank == 1:
                time.sleep(12)  # never joins the collective in time
            else:
                start = time.perf_counter()
                try:
                    Communicator("tangent").combine_jvps(torch.ones(2), 4)
                finally:
                    result["seconds"] = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001 - reported to the test
        result = {**result, "ok": False, "type": type(error).__name__, "message": str(error),
                  "trace": traceback.format_exc()}
    Path(out, f"result{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # a process group left with a timed-out collective may abort in its destructor


def _run(tmp_path: Path, task: str) -> list[dict]:
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), task), nprocs=2,
                       join=True, start_method="spawn")
    return [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2)]


def _parameters(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoint.pt", weights_only=True)["model"]


def test_two_ranks_match_one_process(tmp_path):
    results = _run(tmp_path, "runs")
    assert all(r["ok"] for r in results), results
    for name, (settings, _mode) in SCENARIOS.items():
        single = tmp_path / f"single-{name}"
        train(TrainConfig(**CONFIG, **settings), single, progress=False, log=lambda s: None)
        for key, value in _parameters(single).items():
            torch.testing.assert_close(_parameters(tmp_path / name)[key], value, rtol=1e-4, atol=1e-6,
                                       msg=f"{name}: {key}")
        header, *rows = (tmp_path / name / "metrics.csv").read_text().splitlines()
        bytes_per_step = float(rows[-1].split(",")[header.split(",").index("comm_bytes_per_step")])
        if name in ("tangent-weight", "tangent-lowrank", "data-weight"):
            assert 0 < bytes_per_step <= 8 * CONFIG["num_tangents"] * 2  # k numbers, not n
        assert bytes_per_step > 0


def test_distributed_resume_equals_uninterrupted(tmp_path):
    results = _run(tmp_path, "resume")
    assert all(r["ok"] for r in results), results
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")  # metric rows but seconds, and the checkpoints


def test_ddp_wrapped_models_take_the_full_batch_step_on_every_rank(tmp_path):
    """A training loop with DistributedDataParallel, unchanged but for fill_grad: each rank holds half the
    batch, and every replica ends with the parameters of one process trained on the whole batch."""
    results = _run(tmp_path, "ddp")
    assert all(r["ok"] for r in results), results
    for name, options in DDP_RUNS.items():
        single = ddp_model()
        ddp_steps(single, options, slice(None))
        for rank in range(2):
            replica = torch.load(tmp_path / f"ddp-{name}-{rank}.pt", weights_only=True)
            for key, value in single.state_dict().items():
                torch.testing.assert_close(replica[key], value, rtol=1e-10, atol=1e-12, msg=f"{name} rank {rank}: {key}")


def test_ranks_with_different_seeds_are_detected(tmp_path):
    results = _run(tmp_path, "mismatch")
    for r in results:
        assert not r["ok"] and r["type"] == "DistributedError"
        assert "rank 1 has seed=1 but rank 0 has 0" in r["message"]


def test_a_hanging_rank_fails_the_others_within_the_timeout(tmp_path):
    results = _run(tmp_path, "hang")
    assert results[0]["type"] == "DistributedError"
    assert "another rank died, hung" in results[0]["message"]
    assert results[0]["seconds"] < 10


def test_communicator_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group exists")
    with pytest.raises(ValueError, match="not initialized"):
        Communicator("tangent")
    with pytest.raises(ValueError, match="unknown distributed mode"):
        Communicator("pipeline")
    assert issubclass(DistributedError, RuntimeError)
