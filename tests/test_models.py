"""Tests of frog.training.models: block structure, sizes, parameter counts and forward-mode AD.

The references are independent: autograd (reverse mode) for the jvps, torchvision's published
parameter counts / layer formulas for ResNet18, and torch's own attention kernels for the ViT.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp, vmap

from frog.training.models import MODELS, SelfAttention, attention, block_names, make_model

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
FC_WIDTH = 32  # small width for fast fc tests
BATCH = 3
K = 2  # tangents per jvp check

EXPECTED_NAMES = {
    "fc": ["hidden1", "hidden2", "output"],
    "resmlp": ["stem", "residual1", "residual2", "head"],
    "conv": ["conv1", "conv2", "hidden", "output"],
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4", "head"],
    "vit": [f"encoder{i}" for i in range(1, 7)],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small ops: one intra-op thread avoids thread-pool overhead on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str, shape, num_classes: int = 10, seed: int = 0, dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return make_model(name, shape, num_classes, width=FC_WIDTH).to(dtype)


def images(shape, batch: int = BATCH, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def labels(batch: int = BATCH, num_classes: int = 10) -> torch.Tensor:
    return torch.arange(batch) % num_classes


@contextmanager
def batch_statistics(model: nn.Module):
    """BatchNorm without running statistics (how frog runs train-mode BatchNorm under vmap)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.track_running_stats for m in norms]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, s in zip(norms, saved, strict=False):
            m.track_running_stats = s


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def block_outputs(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    for block in model:
        x = block(x)
        outs.append(x)
    return outs


# ----------------------------------------------------------------------------------------------
# structure and shapes


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_blocks_chain_to_the_model(name, shape):
    model = build(name, shape, num_classes=7).eval()
    x = images(shape)
    with torch.no_grad():
        out = model(x)
        outs = block_outputs(model, x)
    assert out.shape == (BATCH, 7)
    assert torch.equal(outs[-1], out)
    assert block_names(model) == EXPECTED_NAMES[name]
    assert len(outs) == len(list(model.children())) == len(EXPECTED_NAMES[name])
    for o in outs:
        assert isinstance(o, torch.Tensor) and o.shape[0] == BATCH
    _c, h, w = shape
    if name in ("fc", "resmlp"):
        assert [o.shape[1:] for o in outs] == [(FC_WIDTH,)] * (len(outs) - 1) + [(7,)]
    elif name == "conv":
        assert outs[0].shape[1:] == (32, h // 2, w // 2)
        assert outs[1].shape[1:] == (64, h // 4, w // 4)
        assert outs[2].shape[1:] == (128,)
    elif name == "resnet18":
        assert [o.shape[1] for o in outs[:5]] == [64, 64, 128, 256, 512]
        size = lambda n, k, s, p: (n + 2 * p - k) // s + 1
        hs = size(size(h, 7, 2, 3), 3, 2, 1)
        assert outs[0].shape[2] == outs[1].shape[2] == hs
        for o in outs[2:5]:
            hs = size(hs, 3, 2, 1)
            assert o.shape[2] == hs
    else:
        tokens = 1 + (h // 4) * (w // 4)
        for o in outs[:-1]:
            assert o.shape[1:] == (tokens, 256)


@pytest.mark.parametrize("name", MODELS)
def test_blocks_keep_no_state_but_batchnorm_buffers(name):
    shape = (1, 8, 8)
    model = build(name, shape)
    x = images(shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.eval()
        a, b = model(x), model(x)
        assert torch.equal(a, b)
        model.train()
        model(x)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked") for k in changed)
    assert bool(changed) == has_batchnorm(model)
    assert not next(iter(model.parameters())).grad


def test_fc_layers():
    model = make_model("fc", (1, 28, 28), 10, width=256)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 256), (256, 256), (256, 10)]
    assert sum(p.numel() for p in model.parameters()) == 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert isinstance(model.hidden1[-1], nn.ReLU) and isinstance(model.hidden2[-1], nn.ReLU)
    assert make_model("fc", (1, 8, 8), 10).hidden1[1].out_features == 1024  # default width


@pytest.mark.parametrize(
    "h,flat", [(8, 64 * 2 * 2), (28, 64 * 7 * 7), (32, 64 * 8 * 8), (30, 64 * 7 * 7), (4, 64 * 1 * 1)]
)
def test_conv_flatten_size(h, flat):
    model = make_model("conv", (3, h, h), 10)
    assert model.hidden[1].in_features == flat
    assert model(torch.randn(2, 3, h, h)).shape == (2, 10)


def resnet18_reference_count(in_channels: int, num_classes: int) -> int:
    """Parameters of torchvision's resnet18 by its layer formula (convs without bias, BN: 2 per channel)."""
    conv = lambda cin, cout, k: cin * cout * k * k
    bn = lambda c: 2 * c
    total = conv(in_channels, 64, 7) + bn(64)
    cin = 64
    for cout in (64, 128, 256, 512):
        for i in range(2):
            total += conv(cin if i == 0 else cout, cout, 3) + bn(cout) + conv(cout, cout, 3) + bn(cout)
            if i == 0 and cin != cout:
                total += conv(cin, cout, 1) + bn(cout)
        cin = cout
    return total + 512 * num_classes + num_classes


def test_resnet18_parameter_count():
    count = lambda m: sum(p.numel() for p in m.parameters())
    # torchvision.models.resnet18(num_classes=1000) has 11,689,512 parameters
    assert resnet18_reference_count(3, 1000) == 11_689_512
    assert resnet18_reference_count(3, 10) == 11_181_642
    assert count(make_model("resnet18", (3, 32, 32), 10)) == 11_181_642
    one_channel = count(make_model("resnet18", (1, 28, 28), 10))
    assert one_channel == 11_181_642 - 64 * 3 * 49 + 64 * 1 * 49 == 11_175_370
    assert count(make_model("resnet18", (1, 28, 28), 10)) == resnet18_reference_count(1, 10)


def test_resnet18_structure_and_init():
    model = build("resnet18", (3, 32, 32))
    stem_conv = model.stem[0]
    assert (stem_conv.kernel_size, stem_conv.stride, stem_conv.padding) == ((7, 7), (2, 2), (3, 3))
    pool = model.stem[3]
    assert isinstance(pool, nn.MaxPool2d) and (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    for i, stride in zip(range(1, 5), (1, 2, 2, 2), strict=False):
        first, second = getattr(model, f"layer{i}")
        assert first.conv1.stride == (stride, stride)
        assert (first.downsample is None) == (i == 1)
        assert second.downsample is None
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # kaiming_normal_(mode="fan_out", nonlinearity="relu"): std sqrt(2 / (out_channels * k * k))
    w = model.layer4[0].conv2.weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.02)
    assert isinstance(model.head[0], nn.AdaptiveAvgPool2d) and model.head[2].in_features == 512


def test_vit_sizes():
    model = build("vit", (3, 32, 32))
    encoders = [m for m in model.modules() if type(m).__name__ == "EncoderBlock"]
    assert len(encoders) == 6
    for e in encoders:
        assert e.attn.heads == 4 and e.attn.qkv.in_features == 256
        assert e.mlp[0].out_features == 512 and isinstance(e.mlp[1], nn.GELU)
    embed = model.encoder1[0]
    assert embed.proj.kernel_size == embed.proj.stride == (4, 4)
    assert embed.position.shape == (1, 65, 256)
    per_encoder = 2 * 2 * 256 + (256 * 768 + 768) + (256 * 256 + 256) + (256 * 512 + 512) + (512 * 256 + 256)
    expected = 6 * per_encoder + (3 * 16 * 256 + 256) + 256 + 65 * 256 + 2 * 256 + 256 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == expected


def test_vit_attention_matches_scaled_dot_product_attention():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 7, 16, generator=g, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v), ref, rtol=1e-10, atol=1e-12)


def test_vit_self_attention_matches_multihead_attention():
    torch.manual_seed(4)
    attn = SelfAttention(32, 4).double()
    mha = nn.MultiheadAttention(32, 4, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    ref, _ = mha(x, x, x, need_weights=False)
    torch.testing.assert_close(attn(x), ref, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# forward mode: vmap(jvp) against autograd


JVP_CASES = [
    ("fc", (1, 28, 28)),
    ("conv", (1, 8, 8)),
    ("conv", (3, 32, 32)),
    ("resnet18", (1, 28, 28)),
    ("resnet18", (3, 32, 32)),
    ("vit", (1, 8, 8)),
    ("vit", (3, 32, 32)),
]
MODES = ["eval", "train"]


def case_id(value) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


def prepare(name, shape, mode):
    """float64 model in ``mode``, images, labels; train mode runs BatchNorm on batch statistics."""
    model = build(name, shape, dtype=torch.float64)
    model.train(mode == "train")
    batch = 4 if name == "resnet18" else BATCH  # layer4 of resnet18 is 1x1: BN needs > 1 value
    return model, images(shape, batch, dtype=torch.float64), labels(batch)


def random_like(t: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    return torch.randn(k, *t.shape, generator=torch.Generator().manual_seed(seed), dtype=t.dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,shape", JVP_CASES, ids=case_id)
def test_parameter_jvp_under_vmap_matches_autograd(name, shape, mode):
    model, x, y = prepare(name, shape, mode)
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def loss(p):
        return F.cross_entropy(functional_call(model, {**p, **buffers}, (x,)), y)

    tangents = {k: random_like(p, K, seed=i) for i, (k, p) in enumerate(params.items())}
    saved = {k: b.clone() for k, b in buffers.items()}
    with batch_statistics(model):
        values, jvps = vmap(lambda t: jvp(loss, (params,), (t,)))(tangents)
        reference = loss({k: p.requires_grad_(True) for k, p in model.named_parameters()})
        grads = torch.autograd.grad(reference, list(model.parameters()))
    expected = torch.stack([sum((g * tangents[k][i]).sum() for k, g in zip(params, grads, strict=False)) for i in range(K)])
    torch.testing.assert_close(values, reference.detach().expand(K), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jvps, expected, rtol=1e-8, atol=1e-10)
    assert all(torch.equal(b, saved[k]) for k, b in model.named_buffers())  # running stats untouched


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,shape", JVP_CASES, ids=case_id)
def test_activity_jvp_under_vmap_matches_autograd(name, shape, mode):
    """Tangents added to every block output (forward hooks), jvp at z = 0 vs sum_b <dL/dh_b, v_b>."""
    model, x, y = prepare(name, shape, mode)
    with torch.no_grad():
        shapes = [o.shape for o in block_outputs(model.eval(), x)]
    model.train(mode == "train")
    current: dict[str, list] = {"z": []}

    def hook(index):
        return lambda module, inputs, output: output + current["z"][index]

    handles = [block.register_forward_hook(hook(b)) for b, block in enumerate(model)]
    try:

        def loss(*zs):
            current["z"] = zs
            return F.cross_entropy(model(x), y)

        zeros = tuple(torch.zeros(s, dtype=torch.float64) for s in shapes)
        tangents = tuple(random_like(z, K, seed=10 + b) for b, z in enumerate(zeros))
        with batch_statistics(model):
            values, jvps = vmap(lambda *t: jvp(loss, zeros, t))(*tangents)

            # autograd reference: dL/dh_b of every (perturbed) block output
            outputs = []

            def keep(module, inputs, output):
                output.retain_grad()
                outputs.append(output)

            current["z"] = zeros
            retain = [block.register_forward_hook(keep) for block in model]  # after the z hooks
            reference = F.cross_entropy(model(x), y)
            for h in retain:
                h.remove()
            reference.backward()
    finally:
        for h in handles:
            h.remove()
    assert len(outputs) == len(shapes)
    expected = torch.stack([sum((o.grad * t[i]).sum() for o, t in zip(outputs, tangents, strict=False)) for i in range(K)])
    torch.testing.assert_close(values, reference.detach().expand(K), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jvps, expected, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (("mlp", (1, 28, 28), 10), {}, r"unknown model 'mlp'; choose one of fc, resmlp, conv, resnet18, vit"),
        (("fc", (1, 28, 28), 10), {"width": 0}, r"width must be a positive integer, got 0"),
        (("fc", (1, 28, 28), 10), {"width": -3}, r"width must be a positive integer"),
        (("fc", (1, 28, 28), 10), {"width": 2.5}, r"width must be a positive integer, got 2.5"),
        (("fc", (1, 28, 28), 10), {"width": True}, r"width must be a positive integer"),
        (("fc", (28, 28), 10), {}, r"input_shape must have 3 entries \(channels, height, width\)"),
        (("conv", 28, 10), {}, r"input_shape must be a tuple"),
        (("resnet18", (0, 28, 28), 10), {}, r"every entry of input_shape must be a positive integer"),
        (("fc", (1, 28, 28), 0), {}, r"num_classes must be a positive integer"),
        (
            ("vit", (1, 30, 30), 10),
            {},
            r"divisible by 4, got 30x30; pad or resize the images \(e.g. to 32x32\)",
        ),
        (("vit", (3, 32, 30), 10), {}, r"divisible by 4"),
        (("conv", (1, 3, 3), 10), {}, r"at least 4x4 pixels, got 3x3"),
    ],
)
def test_bad_arguments_raise_value_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_model(*args, **kwargs)


def test_block_names_needs_a_sequential():
    with pytest.raises(ValueError, match="expected an nn.Sequential of blocks"):
        block_names(nn.Linear(2, 2))


def test_vit_rejects_images_of_another_size():
    model = make_model("vit", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="built for 4 patches but the images give 49"):
        model(torch.randn(2, 1, 28, 28))
