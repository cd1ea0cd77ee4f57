"""Activity perturbation against independent math, and the training loop end to end."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from resume import assert_resume_is_identical
from torch import nn

import frog
from frog.cli import main
from frog.training.models import make_model
from frog.training.train import TrainConfig, train

F64 = torch.float64


def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(5, 3), nn.Tanh()),
        nn.Sequential(nn.Linear(3, 3), nn.ReLU()),
        nn.Linear(3, 2),
    ).double()


def per_sample_ce(x, y):
    return lambda m: nn.functional.cross_entropy(m(x), y, reduction="none")


def backprop_grads(model, x, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def estimated_grads(model, estimator, loss_fn):
    loss = estimator.fill_grad(model, loss_fn)
    return loss, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("engine", ["jvp", "loop", "sim", "fd"])
def test_activity_frog_with_k_equal_activity_dimension_is_backprop(engine):
    """The activities have 3 + 3 + 2 = 8 entries per sample: 8 tangents span them, frog is exact,
    and the block-local products then give exactly the backprop weight gradient."""
    model = tiny_mlp()
    x, y = torch.randn(4, 5, dtype=F64), torch.tensor([0, 1, 1, 0])
    true = backprop_grads(model, x, y)
    fg = frog.ForwardGradient(8, "project", engine=engine, seed=3, perturbation="activity")
    loss, grads = estimated_grads(model, fg, per_sample_ce(x, y))
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(nn.functional.cross_entropy(model(x), y)), rel=1e-12)
    tol = 1e-6 if engine == "fd" else 1e-10
    for g, t in zip(grads, true, strict=False):
        torch.testing.assert_close(g, t, rtol=tol, atol=tol)


def tiny_batchnorm_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(5, 3), nn.BatchNorm1d(3), nn.Tanh()),
        nn.Sequential(nn.Linear(3, 3), nn.Tanh()),
        nn.Linear(3, 2),
    ).double().train()


@pytest.mark.parametrize("engine", ["jvp", "loop", "sim", "fd"])
def test_activity_with_train_mode_batchnorm_what_each_engine_estimates(engine):
    """With batch statistics, l_i depends on every h_j. With k = activity dimension (8) frog is exact in
    what its jvps measure: sim gives the backprop gradient, sum_i (dh_i/dW)^T sum_j dl_j/dh_i, while
    forward mode (jvp, loop, fd: one tangent shared by the batch) gives sum_i (dh_i/dW)^T sum_j dl_i/dh_j,
    the samples' coupling transposed, which is not the gradient. Both computed here by autograd."""
    model = tiny_batchnorm_mlp()
    x, y = torch.randn(6, 5, dtype=F64, generator=torch.Generator().manual_seed(4)), torch.tensor([0, 1, 1, 0, 1, 0])
    reference = copy.deepcopy(model)
    true = backprop_grads(reference, x, y)
    # forward mode's target: u_i = d l_i / d s, s a shift of every block's output shared by the batch
    shifts = [torch.zeros(f, dtype=F64, requires_grad=True) for f in (3, 3, 2)]
    outputs = []

    def shifted(block, shift):
        def hook(module, args, output):
            outputs.append(output)
            return output + shift
        return block.register_forward_hook(hook)

    hooks = [shifted(b, s) for b, s in zip(reference, shifts, strict=True)]
    losses = nn.functional.cross_entropy(reference(x), y, reduction="none")
    for h in hooks:
        h.remove()
    rows = [torch.autograd.grad(losses[i], shifts, retain_graph=True) for i in range(6)]  # u_i per block
    transposed = []
    for b, (block, h) in enumerate(zip(reference, outputs, strict=True)):
        u = torch.stack([r[b] for r in rows]) / 6  # (B, f_b), of the mean loss
        transposed += torch.autograd.grad(h, list(block.parameters()), u, retain_graph=True)
    assert max(float((a - b).norm() / b.norm()) for a, b in zip(transposed, true, strict=True)) > 0.05

    fg = frog.ForwardGradient(8, "project", engine=engine, seed=3, perturbation="activity", scale_correction=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, grads = estimated_grads(model, fg, per_sample_ce(x, y))
        estimated_grads(model, fg, per_sample_ce(x, y))  # warned once per estimator
    coupled = [w for w in caught if "couples the samples" in str(w.message)]
    assert len(coupled) == (0 if engine == "sim" else 1)
    expected = true if engine == "sim" else transposed
    tol = 1e-6 if engine == "fd" else 1e-10
    for g, t in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, t, rtol=tol, atol=tol)


def test_activity_estimate_matches_explicit_projection():
    """Weight gradient = sum over samples of block-local VJPs of P_U(dl_i/dh), built by hand."""
    model = tiny_mlp()
    x, y = torch.randn(6, 5, dtype=F64), torch.tensor([0, 1, 1, 0, 1, 0])
    fg = frog.ForwardGradient(3, "project", engine="sim", seed=5, perturbation="activity", scale_correction=False)
    plan = fg.plan([torch.Size([3]), torch.Size([3]), torch.Size([2])], x)
    tangents = torch.cat([plan.block(b) for b in range(3)], dim=1)  # (k, 8): the global tangent
    _, grads = estimated_grads(model, fg, per_sample_ce(x, y))

    # independent: per-sample activity gradients by autograd, projection by least squares
    outputs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outputs.append(o)) for b in model]
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    for h in hooks:
        h.remove()
    activity_grads = torch.cat([g.reshape(6, -1) for g in torch.autograd.grad(losses.sum(), outputs, retain_graph=True)], 1)
    coeffs = torch.linalg.lstsq(tangents.T, activity_grads.T).solution  # (k, B)
    projected = (tangents.T @ coeffs).T / 6  # (B, 8), the mean loss
    splits = projected.split([3, 3, 2], dim=1)
    expected = []
    for block, h, g in zip(model, outputs, splits, strict=False):
        expected += torch.autograd.grad(h, list(block.parameters()), g, retain_graph=True)
    for got, want in zip(grads, expected, strict=False):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("model_name", ["fc", "vit"])
def test_activity_engines_agree_on_networks(model_name):
    torch.manual_seed(1)
    model = make_model(model_name, (1, 8, 8), 10, width=16).double()
    x, y = torch.randn(5, 1, 8, 8, dtype=F64), torch.randint(0, 10, (5,))
    grads = {}
    for engine in ("sim", "jvp", "loop"):
        fg = frog.ForwardGradient(4, "project", engine=engine, seed=11, perturbation="activity")
        grads[engine] = estimated_grads(model, fg, per_sample_ce(x, y))[1]
    for engine in ("jvp", "loop"):
        for a, b in zip(grads[engine], grads["sim"], strict=False):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def table1_estimates(name: str, perturbation: str, train_mode: bool, k: int) -> dict[str, tuple[torch.Tensor, list]]:
    """One fill_grad step of the Table I network ``name`` on 4 random Fashion-MNIST-shaped images
    (1 x 28 x 28, 10 classes), as ``frog train`` runs it (frog, plain estimator), per engine: the
    returned loss and the parameter estimates. Checks that they are finite and shaped like the
    parameters, and that the loss is the batch's mean cross-entropy."""
    torch.manual_seed(0)
    model = make_model(name, (1, 28, 28), 10).train(train_mode)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    reduction = "none" if perturbation == "activity" else "mean"
    out = {}
    for engine in ("sim", "jvp"):
        fg = frog.ForwardGradient(k, "project", engine=engine, seed=3, perturbation=perturbation,
                                  scale_correction=False)
        loss = fg.fill_grad(model, lambda m: nn.functional.cross_entropy(m(x), y, reduction=reduction))
        grads = [p.grad.clone() for p in model.parameters()]
        assert all(g.shape == p.shape and torch.isfinite(g).all() for g, p in zip(grads, model.parameters(),
                                                                                   strict=True)), engine
        with torch.no_grad():
            assert float(loss) == pytest.approx(float(nn.functional.cross_entropy(model(x), y)), rel=1e-5)
        out[engine] = loss, grads
    return out


def flat_cosine_and_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """Cosine of the concatenated estimates and |a - b| / |b|."""
    a, b = torch.cat([g.flatten() for g in a]).double(), torch.cat([g.flatten() for g in b]).double()
    return float(a @ b / (a.norm() * b.norm())), float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name, perturbation, train_mode", [
    ("resnet18", "activity", False),  # BatchNorm with running statistics: the samples do not interact
    ("resnet18", "weight", True),  # one scalar loss: both engines give its exact directional derivatives
    ("vit", "activity", True),
    ("vit", "weight", True),
])
def test_table1_networks_sim_and_jvp_give_the_same_estimate(name, perturbation, train_mode):
    estimates = table1_estimates(name, perturbation, train_mode, k=16 if perturbation == "activity" else 4)
    (sim_loss, sim), (jvp_loss, jvp) = estimates["sim"], estimates["jvp"]
    assert float(sim_loss) == pytest.approx(float(jvp_loss), rel=1e-5)
    assert flat_cosine_and_error(jvp, sim)[1] < 1e-4


def test_resnet18_train_mode_batchnorm_couples_the_samples_of_activity_jvps():
    """BatchNorm with batch statistics makes every loss l_i depend on every sample's activity h_j. With a
    tangent v shared by the batch, jvp gives d_i = <sum_j dl_i/dh_j, v>, sim d_i = <d(sum_j l_j)/dh_i, v>
    (SimEngine): equal in sum over i, not per sample, so the estimates differ (benchmarks/studies/batchnorm.py
    measures by how much on real batches)."""
    estimates = table1_estimates("resnet18", "activity", True, k=16)
    assert flat_cosine_and_error(estimates["jvp"][1], estimates["sim"][1])[0] < 0.99


@pytest.mark.parametrize("engine", ["jvp", "loop", "sim", "fd"])
def test_activity_batchnorm_statistics_updated_once(engine):
    torch.manual_seed(2)
    model = make_model("conv", (1, 8, 8), 10)
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    with torch.no_grad():
        reference(x)
    frog.ForwardGradient(4, engine=engine, perturbation="activity").fill_grad(model, per_sample_ce(x, y))
    for (name, a), b in zip(model.named_buffers(), reference.buffers(), strict=False):
        torch.testing.assert_close(a, b, msg=name)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_activity_needs_per_sample_losses_and_blocks():
    model = tiny_mlp()
    x, y = torch.randn(4, 5, dtype=F64), torch.tensor([0, 1, 1, 0])
    fg = frog.ForwardGradient(2, perturbation="activity")
    with pytest.raises(ValueError, match="per-sample losses"):
        fg.fill_grad(model, lambda m: nn.functional.cross_entropy(m(x), y))
    plain = nn.Linear(5, 2)
    with pytest.raises(ValueError, match="blocks"):
        fg.fill_grad(plain, lambda m: nn.functional.cross_entropy(m(x.float()), y, reduction="none"))
    with pytest.raises(ValueError, match="outside every block"):
        frog.ForwardGradient(2, perturbation="activity", blocks=[model[0]]).fill_grad(model, per_sample_ce(x, y))
    with pytest.raises(ValueError, match="unknown perturbation"):
        frog.ForwardGradient(2, perturbation="neurons")


def test_activity_needs_batch_first_outputs():
    """A sequence-first LSTM language model (outputs (T, B, C)) with per-token losses (T * B,)."""
    torch.manual_seed(0)

    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.rnn, self.head = nn.Embedding(9, 4), nn.LSTM(4, 5), nn.Linear(5, 9)

        def forward(self, idx):
            return self.head(self.rnn(self.embed(idx))[0])

    idx, targets = torch.randint(0, 9, (7, 3)), torch.randint(0, 9, (21,))
    fg = frog.ForwardGradient(2, perturbation="activity")
    with pytest.raises(ValueError, match=r"no block output starts with 21 \(outputs \(7, 3, 4\)"):
        fg.fill_grad(SequenceFirst(), lambda m: nn.functional.cross_entropy(m(idx).view(-1, 9), targets, reduction="none"))


def test_frog_trains_fc_on_digits_above_chance(tmp_path):
    config = TrainConfig(model="fc", width=256, dataset="digits", gradient="frog", num_tangents=16, lr=0.3,
                         batch_size=16, epochs=1)
    rows = train(config, tmp_path, progress=False, log=lambda s: None)
    assert len(rows) == 1
    assert float(rows[0]["test_accuracy"]) > 0.3  # chance is 0.1
    assert float(rows[0]["val_accuracy"]) > 0.3


def test_resume_equals_uninterrupted(tmp_path):
    config = TrainConfig(model="fc", width=32, dataset="digits", gradient="fg-mean", num_tangents=4, lr=0.05,
                         batch_size=32, epochs=3)
    assert_resume_is_identical(config, tmp_path)  # interrupted after epoch 1


def test_cosine_schedule_sets_every_steps_size_and_resumes_exactly(tmp_path, monkeypatch):
    """--lr-schedule cosine: step t of T takes lr (1 + cos(pi t / T)) / 2, across epochs and a resume."""
    config = TrainConfig(model="fc", width=16, dataset="digits", gradient="bp", lr=0.2, batch_size=256, epochs=3,
                         lr_schedule="cosine")
    seen, before_resume = [], []
    step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    def split(folder):
        before_resume.extend(seen)
        seen.clear()

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    # killed after epoch 1's checkpoint (on_epoch raises), then resumed
    assert_resume_is_identical(config, tmp_path, stop="on_epoch", before_resume=split)
    # before the resume: the straight run's 3 epochs and the interrupted run's first; the resume: epochs 2 and 3
    per_epoch = len(seen) // 2
    total = 3 * per_epoch
    assert len(seen) == 2 * per_epoch and len(before_resume) == total + per_epoch and per_epoch > 1
    schedule = [0.1 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    assert before_resume == pytest.approx(schedule + schedule[:per_epoch], rel=1e-12)
    assert seen == pytest.approx(schedule[per_epoch:], rel=1e-12)


@pytest.mark.parametrize("sampler", ["lowrank", "input-span"])
def test_structured_tangents_train_and_resume_from_the_cli(tmp_path, sampler):
    args = ["train", "--model", "fc", "--width", "16", "--dataset", "digits", "--gradient", "frog", "-k", "4",
            "--perturbation", "weight", "--sampler", sampler, "--rank", "2", "--lr", "1.0", "--seed", "1"]
    config = TrainConfig(model="fc", width=16, dataset="digits", gradient="frog", num_tangents=4,
                         perturbation="weight", sampler=sampler, rank=2, lr=1.0, seed=1, epochs=2)

    def run_cli(config, folder, *, resume=False):
        assert main([*args, "--epochs", str(config.epochs), *(["--resume"] if resume else []), "--out",
                     str(folder)]) == 0

    def check_settings(folder):
        saved = json.loads((folder / "config.json").read_text())
        assert (saved["config"]["sampler"], saved["config"]["rank"], saved["config"]["epochs"]) == (sampler, 2, 2)

    assert_resume_is_identical(config, tmp_path, run=run_cli, before_resume=check_settings)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    torch.manual_seed(1)  # the run's initial weights: the structured estimates moved them
    initial = make_model("fc", (1, 8, 8), 10, width=16).state_dict()
    assert all(a[name].shape == initial[name].shape and not torch.equal(a[name], initial[name]) for name in a)


def test_resume_refuses_other_settings(tmp_path):
    config = TrainConfig(model="fc", width=16, dataset="digits", gradient="bp", lr=0.1, epochs=1)
    train(config, tmp_path, progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="settings differ"):
        train(TrainConfig(**{**config.__dict__, "width": 32}), tmp_path, resume=True, progress=False,
              log=lambda s: None)
    # the tangent budget changes memory use, not the numbers: a resume may change it
    rows = train(TrainConfig(**{**config.__dict__, "tangent_budget_mb": 1.0}), tmp_path, resume=True,
                 progress=False, log=lambda s: None)
    assert len(rows) == 1


def test_weight_perturbation_and_early_stopping(tmp_path):
    # a step size this small makes no progress: validation stalls and patience 1 stops early
    config = TrainConfig(model="fc", width=16, dataset="digits", gradient="frog", num_tangents=2,
                         perturbation="weight", lr=1e-12, epochs=5, patience=1)
    rows = train(config, tmp_path, progress=False, log=lambda s: None)
    assert len(rows) < 5
    stored = json.loads((tmp_path / "config.json").read_text())["config"]
    assert stored["perturbation"] == "weight" and stored["batch_size"] == 64
    again = train(config, tmp_path, resume=True, progress=False, log=lambda s: None)  # a finished run: nothing to do
    assert again == rows


def test_training_is_deterministic(tmp_path):
    config = TrainConfig(model="conv", dataset="digits", gradient="frog", num_tangents=4, lr=0.05, epochs=1)
    a = train(config, tmp_path / "a", progress=False, log=lambda s: None)
    b = train(config, tmp_path / "b", progress=False, log=lambda s: None)
    assert [r["val_loss"] for r in a] == [r["val_loss"] for r in b]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "mnist"], "--data-dir"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "/nonexistent"),
        (["--model", "conv"], "--lr"),
        (["--model", "mlp"], "unknown model"),
        (["--gradient", "adam"], "unknown method"),
        (["--engine", "magic"], "unknown engine"),
        (["--lr-schedule", "cosine", "--optimizer", "line-search"], "drop --lr-schedule"),
        (["-k", "0"], ">= 1"),
        (["--sampler", "lowrank"], "use perturbation='weight'"),
        (["--sampler", "lowrank", "--perturbation", "weight", "--rank", "0"], "rank must be an integer >= 1"),
        (["--sampler", "lowrank", "--perturbation", "weight", "--rank", "20", "--width", "16", "--lr", "0.1"],
         "rank 20 exceeds"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--epochs", "0"], "cuda" if not torch.cuda.is_available() else ">= 1"),
    ],
)
def test_train_cli_bad_input(tmp_path, capsys, args, message):
    assert main(["train", *args, "--epochs", "1", "--out", str(tmp_path)] if "--epochs" not in args
                else ["train", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("frog: error:") and message in err and "\n" not in err
