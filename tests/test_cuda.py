"""frog on a CUDA device, against the same independent math as on the CPU: every engine's estimate is
the least-squares projection of the autograd gradient onto the tangents (dense and lowrank), the
engines agree with BatchNorm, the Table I networks give finite estimates under sim and jvp, the same
seed gives the same numbers, and a run resumed from a checkpoint (CUDA RNG state included) equals an
uninterrupted one.

Marked ``cuda``: ``pytest -m cuda`` runs these (and the other CUDA tests); without a CUDA device they
are skipped with the reason. FROG_TEST_DEVICE=cpu runs them on the CPU; benchmarks/gpu_check.sh runs
them on a GPU machine.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from conftest import lstsq_projection, rel_err
from resume import assert_resume_is_identical
from torch import nn
from torch.nn import functional as F

import frog
from frog.tangents import TangentPlan
from frog.training import checkpoints
from frog.training.data import batches, load_dataset
from frog.training.models import make_model
from frog.training.train import TrainConfig

# FROG_TEST_DEVICE=cpu runs the same tests on the CPU (benchmarks/gpu_check.sh --dry-run)
DEVICE = torch.device(os.environ.get("FROG_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")]
F64 = torch.float64
ENGINES = ("jvp", "loop", "sim", "fd")
TOL = {"jvp": 1e-9, "loop": 1e-9, "sim": 1e-9, "fd": 1e-5}


@pytest.fixture(autouse=True)
def full_float32_convolutions():
    """cuDNN convolutions default to TF32 (10-bit mantissa) on Ampere and later: the same convolution in
    two kernels (plain, and batched over tangents by vmap) then differs by ~1e-3. Off here, so that the
    float32 comparisons check the math."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2),
                         nn.Flatten(), nn.Linear(2 * 2 * 2, 3))


def cnn_with_batchnorm() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3))


MODELS = {"mlp": (mlp, (4, 6)), "cnn": (cnn, (2, 2, 4, 4)), "cnn-bn": (cnn_with_batchnorm, (4, 2, 4, 4))}


def setup(name: str):
    """A float64 model on the GPU, its loss (mean cross-entropy of a fixed batch) and the batch."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().to(DEVICE, F64)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=F64).to(DEVICE)
    y = (torch.arange(shape[0]) % 3).to(DEVICE)
    return model, (lambda m: F.cross_entropy(m(x), y))


def true_gradient(model: nn.Module, loss_fn) -> torch.Tensor:
    model.zero_grad()
    loss_fn(model).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad()
    return g


def estimate(model: nn.Module, loss_fn, **options) -> torch.Tensor:
    """The plain projection's estimate (no length correction), flat (n,), on the GPU."""
    fg = frog.ForwardGradient(**{"num_tangents": 6, "seed": 3, "scale_correction": False, **options})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fg.fill_grad(model, loss_fn)
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def dense_tangents(model: nn.Module, k: int, kind: str, rank: int) -> torch.Tensor:
    """The call's tangents (k, n), formed densely on the GPU from an independent plan with the same key."""
    shapes = [p.shape for p in model.parameters()]
    plan = TangentPlan(kind, k, shapes, seed=3, step=0, device=DEVICE, dtype=F64, rank=rank)
    return torch.cat([plan.dense(b).reshape(k, -1) for b in range(len(shapes))], dim=1)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("kind", ["normal", "lowrank"])
@pytest.mark.parametrize("engine", ENGINES)
def test_estimate_is_the_projection_onto_the_tangents(name, kind, engine):
    model, loss_fn = setup(name)
    rank = 2 if kind == "lowrank" else 1
    got = estimate(model, loss_fn, sampler=kind, rank=rank, engine=engine)
    assert got.device.type == DEVICE.type
    expected = lstsq_projection(dense_tangents(model, 6, kind, rank).cpu(), true_gradient(model, loss_fn).cpu())
    assert rel_err(got.cpu(), expected) < TOL[engine]


@pytest.mark.parametrize("aggregation", frog.METHODS)
def test_engines_agree_with_batchnorm_in_train_mode(aggregation):
    model, loss_fn = setup("cnn-bn")
    reference = estimate(model, loss_fn, aggregation=aggregation, engine="sim")
    for engine in ("jvp", "loop", "fd"):
        got = estimate(model, loss_fn, aggregation=aggregation, engine=engine, fd_step=1e-4)
        assert rel_err(got, reference) < TOL[engine], engine


@pytest.mark.parametrize("engine", ["jvp", "loop"])
def test_k_equal_n_is_the_exact_gradient(engine):
    model, loss_fn = setup("mlp")
    n = sum(p.numel() for p in model.parameters())
    assert rel_err(estimate(model, loss_fn, num_tangents=n, engine=engine), true_gradient(model, loss_fn)) < 1e-9


@pytest.mark.parametrize("kind", ["normal", "lowrank"])
def test_same_seed_same_numbers(kind):
    model, loss_fn = setup("mlp")
    first = estimate(model, loss_fn, sampler=kind, engine="jvp").clone()
    assert torch.equal(estimate(model, loss_fn, sampler=kind, engine="jvp"), first)


@pytest.mark.parametrize("name", ["resnet18", "vit"])
@pytest.mark.parametrize("perturbation", ["activity", "weight"])
def test_table1_networks_fill_grad_under_sim_and_jvp(name, perturbation):
    """One step as ``frog train`` runs it (float32, train mode, tiny batch): finite estimates on the GPU,
    the batch's loss returned, and jvp equal to sim where the samples do not interact (weight
    perturbation: one scalar loss; ResNet18's BatchNorm couples them under activity perturbation)."""
    torch.manual_seed(0)
    model = make_model(name, (1, 28, 28), 10).to(DEVICE)
    x, y = torch.randn(4, 1, 28, 28, device=DEVICE), torch.randint(0, 10, (4,), device=DEVICE)
    reduction = "none" if perturbation == "activity" else "mean"
    estimates = {}
    for engine in ("sim", "jvp"):
        fg = frog.ForwardGradient(8, engine=engine, seed=3, perturbation=perturbation, scale_correction=False)
        loss = fg.fill_grad(model, lambda m: F.cross_entropy(m(x), y, reduction=reduction))
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert grads.device.type == DEVICE.type and torch.isfinite(grads).all(), engine
        with torch.no_grad():
            assert float(loss) == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-4)
        estimates[engine] = grads
    if perturbation == "weight" or name == "vit":
        assert rel_err(estimates["jvp"], estimates["sim"]) < 1e-3


@pytest.mark.parametrize("name", ["lstm", "gru", "embedding bag + weight norm", "ctc", "transformer with dropout"])
def test_forward_mode_engines_equal_sim_through_frogs_kernels(name):
    """The layers that frog.forward_mode.plain_kernels and frog.forward_mode.masks handle (cuDNN's RNNs,
    EmbeddingBag, weight norm, CTC, dropout in every pass), on the device: jvp and loop give sim's estimate."""
    from test_masks import Encoder
    from test_plain_kernels import MODELS as KERNEL_MODELS

    torch.manual_seed(0)
    if name == "transformer with dropout":
        model = Encoder(0.2).to(DEVICE, F64)
        idx, y = torch.randint(0, 20, (6, 5), device=DEVICE), (torch.arange(6) % 3).to(DEVICE)
        loss_fn = lambda m: F.cross_entropy(m(idx), y)
    else:
        build, dtype = KERNEL_MODELS[name]
        model = build().to(DEVICE, dtype)
        idx, y = torch.randint(0, 12, (5, 7), device=DEVICE), (torch.arange(5) % 3).to(DEVICE)
        frames, labels = torch.randn(5, 7, 4, dtype=dtype, device=DEVICE), torch.randint(1, 3, (5, 3), device=DEVICE)
        loss_fn = (lambda m: F.ctc_loss(m(frames), labels, [7] * 5, [3, 2, 3, 1, 2])) if name == "ctc" \
            else (lambda m: F.cross_entropy(m(idx), y))
    estimates = {}
    for engine in ("sim", "jvp", "loop"):
        m = copy.deepcopy(model)
        torch.manual_seed(7)  # the dropout masks
        frog.ForwardGradient(4, engine=engine, seed=1).fill_grad(m, loss_fn)
        estimates[engine] = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    tol = 1e-5 if name == "lstm" else 1e-9  # the LSTM runs in float32
    for engine in ("jvp", "loop"):
        assert rel_err(estimates[engine], estimates["sim"]) < tol, engine


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(5)
    path = tmp_path / "checkpoint.pt"
    checkpoints.save(path, {"rng": checkpoints.rng_state(DEVICE)})
    expected = torch.rand(8, device=DEVICE), torch.rand(8)
    checkpoints.set_rng_state(checkpoints.load(path, map_location=DEVICE)["rng"], DEVICE)
    got = torch.rand(8, device=DEVICE), torch.rand(8)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_batches_on_cuda():
    split = load_dataset("digits").train
    x, y = next(iter(batches(split, 8, shuffle=True, generator=torch.Generator().manual_seed(0), device=DEVICE)))
    assert x.device.type == DEVICE.type and y.device.type == DEVICE.type and x.shape[0] == 8


def test_resume_on_cuda_equals_uninterrupted(tmp_path):
    config = TrainConfig(model="fc", width=64, dataset="digits", gradient="frog", num_tangents=16, lr=0.3,
                         batch_size=16, epochs=2, device=str(DEVICE))
    straight, _ = assert_resume_is_identical(config, tmp_path)  # rows, model, optimizer, CPU and CUDA random state
    assert float(straight[-1]["test_accuracy"]) > 0.2  # chance is 0.1
