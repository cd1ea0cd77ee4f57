"""Networks of the paper's experiments, cut into blocks for activity-perturbed forward gradients.

Every model is an :class:`torch.nn.Sequential` whose children are the *blocks*: each block takes
exactly the previous block's output tensor (the first block: images of shape (B, C, H, W)) and
returns one tensor of shape (B, *features). frog adds a tangent to each block output and computes a
block's weight gradient locally from the forward gradient of its output, so a block keeps no state
across calls (BatchNorm running statistics aside) and every operation has a forward-mode AD rule
(``torch.func.jvp`` under ``torch.func.vmap``). Attention is therefore written with plain matmul +
softmax instead of the fused kernels of ``nn.MultiheadAttention`` / ``scaled_dot_product_attention``.

========  ==========================================================  ==========================
model     blocks (children of the Sequential)                         block outputs
========  ==========================================================  ==========================
fc        hidden1 = Flatten+Linear(in, w)+ReLU, hidden2 .. hidden{d} =  (B, w) x d, (B, classes)
          Linear(w, w)+ReLU, output = Linear(w, classes); depth d = 2
          as in the paper
resmlp    stem = Flatten+Linear(in, w), residual1 .. residual{d}:       (B, w) x (d + 1),
          h + W2 ReLU(W1 LN(h)) (pre-norm, W1, W2: w x w),              (B, classes)
          head = LayerNorm+Linear(w, classes)
conv      conv1 = Conv3x3(32)+BN+ReLU+MaxPool2, conv2 = Conv3x3(64)+    (B, 32, H/2, W/2), ...,
          BN+ReLU+MaxPool2, hidden = Flatten+Linear(.., 128)+ReLU,      (B, 128), (B, classes)
          output = Linear(128, classes)
resnet18  stem, layer1, layer2, layer3, layer4, head (torchvision's      (B, 64, ...), ...,
          ResNet18; the stem takes input_shape[0] channels)             (B, classes)
vit       encoder1 (patch embedding + class token + position            (B, T, 256) x 5,
          embedding + encoder block 1), encoder2 .. encoder5,           (B, classes)
          encoder6 (encoder block 6 + LayerNorm + Linear on the class
          token); 6 blocks, 4 heads, hidden 256, MLP 512, patch 4
========  ==========================================================  ==========================

BatchNorm in training mode works in every engine: ``ForwardGradient`` stops the running statistics
from updating during its forward-mode passes (``track_running_stats`` off, batch statistics as
usual) and updates them once per call with one plain pass. Code that runs these models under its own
``vmap`` over the data must do the same: an in-place write of a batched tensor into an unbatched
buffer fails.
"""

from __future__ import annotations

import math
import operator
from collections import OrderedDict

import torch
from torch import nn

MODELS = ("fc", "resmlp", "conv", "resnet18", "vit")

# Sizes of the paper's ViT (Sec. 4.5, Table I).
VIT_DEPTH = 6
VIT_HEADS = 4
VIT_HIDDEN = 256
VIT_MLP = 512
VIT_PATCH = 4

CONV_CHANNELS = (32, 64)
CONV_HIDDEN = 128


def _positive_int(value, what: str, hint: str) -> int:
    """``value`` as a positive int, or ValueError saying what to change."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a positive integer, got {value!r}; {hint}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be a positive integer, got {value!r}; {hint}") from None
    if number < 1:
        raise ValueError(f"{what} must be a positive integer, got {number}; {hint}")
    return number


def _check_input_shape(input_shape) -> tuple[int, int, int]:
    hint = "pass input_shape=(channels, height, width) of one image, e.g. (1, 28, 28) for MNIST"
    try:
        dims = tuple(input_shape)
    except TypeError:
        raise ValueError(
            f"input_shape must be a tuple (channels, height, width), got {input_shape!r}; {hint}"
        ) from None
    if len(dims) != 3:
        raise ValueError(
            f"input_shape must have 3 entries (channels, height, width), got {len(dims)}: {input_shape!r}; {hint}"
        )
    c, h, w = (_positive_int(d, "every entry of input_shape", hint) for d in dims)
    return c, h, w


# ----------------------------------------------------------------------------------------------
# fully connected


def _fc(input_shape: tuple[int, int, int], num_classes: int, width: int, depth: int) -> nn.Sequential:
    features = math.prod(input_shape)
    blocks: OrderedDict[str, nn.Module] = OrderedDict(
        hidden1=nn.Sequential(nn.Flatten(), nn.Linear(features, width), nn.ReLU()))
    for i in range(2, depth + 1):
        blocks[f"hidden{i}"] = nn.Sequential(nn.Linear(width, width), nn.ReLU())
    blocks["output"] = nn.Linear(width, num_classes)
    return nn.Sequential(blocks)


class ResidualBlock(nn.Module):
    """A pre-norm residual MLP block on features (B, w): h + W2 ReLU(W1 LN(h))."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.inner = nn.Linear(width, width)
        self.outer = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.outer(torch.relu(self.inner(self.norm(h))))


def _resmlp(input_shape: tuple[int, int, int], num_classes: int, width: int, depth: int) -> nn.Sequential:
    blocks: OrderedDict[str, nn.Module] = OrderedDict(
        stem=nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width)))
    for i in range(1, depth + 1):
        blocks[f"residual{i}"] = ResidualBlock(width)
    blocks["head"] = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes))
    return nn.Sequential(blocks)


# ----------------------------------------------------------------------------------------------
# small CNN


def _conv(input_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    c, h, w = input_shape
    if h < 4 or w < 4:
        raise ValueError(
            f"model 'conv' halves the image twice (two 2x2 max-pools) and needs at least 4x4 pixels, "
            f"got {h}x{w}; resize the images or use model 'fc' or 'resnet18'"
        )
    c1, c2 = CONV_CHANNELS
    flat = c2 * (h // 2 // 2) * (w // 2 // 2)

    def conv_block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
        )

    return nn.Sequential(
        OrderedDict(
            conv1=conv_block(c, c1),
            conv2=conv_block(c1, c2),
            hidden=nn.Sequential(nn.Flatten(), nn.Linear(flat, CONV_HIDDEN), nn.ReLU()),
            output=nn.Linear(CONV_HIDDEN, num_classes),
        )
    )


# ----------------------------------------------------------------------------------------------
# ResNet18 (torchvision's architecture, without torchvision)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with a residual connection (torchvision's BasicBlock)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _resnet18(input_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    c = input_shape[0]
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    blocks["stem"] = nn.Sequential(
        nn.Conv2d(c, 64, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
    )
    in_channels = 64
    for i, (channels, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        blocks[f"layer{i}"] = nn.Sequential(
            BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels, 1)
        )
        in_channels = channels
    blocks["head"] = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(512, num_classes))
    model = nn.Sequential(blocks)
    for m in model.modules():  # torchvision's initialization
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return model


# ----------------------------------------------------------------------------------------------
# Vision Transformer


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dims, (..., T, d) -> (..., T, d).

    Plain matmul + softmax, so that forward-mode AD (and vmap over tangents) works everywhere.
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return torch.softmax(scores, dim=-1) @ v


class SelfAttention(nn.Module):
    """Multi-head self-attention on tokens (B, T, dim), with a fused qkv projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by the number of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2])  # (B, heads, T, d / heads)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: x + MSA(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbedding(nn.Module):
    """Images (B, C, H, W) -> tokens (B, 1 + (H/p)(W/p), dim): patches, class token, positions."""

    def __init__(self, input_shape: tuple[int, int, int], patch: int, dim: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.num_patches = (h // patch) * (w // patch)
        self.proj = nn.Conv2d(c, dim, kernel_size=patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.proj(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        if patches.shape[1] != self.num_patches:
            raise ValueError(
                f"the ViT was built for {self.num_patches} patches but the images give {patches.shape[1]}; "
                f"build the model with the input_shape of these images"
            )
        cls = self.class_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position


class ClassifierHead(nn.Module):
    """LayerNorm + Linear on the class token: tokens (B, T, dim) -> logits (B, classes)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x[:, 0]))


def _vit(input_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    _, h, w = input_shape
    if h % VIT_PATCH or w % VIT_PATCH:
        raise ValueError(
            f"model 'vit' cuts images into {VIT_PATCH}x{VIT_PATCH} patches and needs height and width "
            f"divisible by {VIT_PATCH}, got {h}x{w}; pad or resize the images "
            f"(e.g. to {math.ceil(h / VIT_PATCH) * VIT_PATCH}x{math.ceil(w / VIT_PATCH) * VIT_PATCH})"
        )
    encoders = [EncoderBlock(VIT_HIDDEN, VIT_HEADS, VIT_MLP) for _ in range(VIT_DEPTH)]
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    for i, encoder in enumerate(encoders, start=1):
        parts: list[nn.Module] = [encoder]
        if i == 1:
            parts.insert(0, PatchEmbedding(input_shape, VIT_PATCH, VIT_HIDDEN))
        if i == VIT_DEPTH:
            parts.append(ClassifierHead(VIT_HIDDEN, num_classes))
        blocks[f"encoder{i}"] = nn.Sequential(*parts)
    model = nn.Sequential(blocks)
    for m in model.modules():  # ViT initialization (timm style): small weights, zero biases
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return model


# ----------------------------------------------------------------------------------------------
# public API


def make_model(
    name: str, input_shape: tuple[int, int, int], num_classes: int, *, width: int = 1024, depth: int = 2
) -> nn.Sequential:
    """The network ``name`` (one of :data:`MODELS`) as an ``nn.Sequential`` of blocks.

    Args:
        name: "fc", "resmlp", "conv", "resnet18" or "vit".
        input_shape: (channels, height, width) of one image; the models are built for this size.
        num_classes: number of outputs (logits).
        width: hidden width of "fc" and "resmlp" (the paper uses 256, 1024 and 4096 for "fc"); the
            other models ignore it.
        depth: hidden layers of "fc" (the paper: 2), residual blocks of "resmlp"; the others ignore it.

    Raises:
        ValueError: unknown name, non-positive sizes, or images the model cannot take.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    shape = _check_input_shape(input_shape)
    num_classes = _positive_int(num_classes, "num_classes", "pass the number of classes, e.g. 10")
    width = _positive_int(width, "width", "pass the hidden width of the fc model, e.g. width=1024")
    depth = _positive_int(depth, "depth", "pass the number of hidden layers, e.g. depth=2")
    if name == "fc":
        return _fc(shape, num_classes, width, depth)
    if name == "resmlp":
        return _resmlp(shape, num_classes, width, depth)
    if name == "conv":
        return _conv(shape, num_classes)
    if name == "resnet18":
        return _resnet18(shape, num_classes)
    return _vit(shape, num_classes)


def block_names(model: nn.Module) -> list[str]:
    """Names of the blocks (the children of the ``nn.Sequential``), in forward order."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"expected an nn.Sequential of blocks (as make_model returns), got {type(model).__name__}; "
            "wrap the blocks of the network in nn.Sequential"
        )
    return [name for name, _ in model.named_children()]
