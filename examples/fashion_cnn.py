"""The classic PyTorch MNIST example (a CNN, Adadelta at lr 1.0, StepLR with gamma 0.7) on
Fashion-MNIST, trained by backprop or by frog: the swap is one line.

    python examples/fashion_cnn.py --gradient bp
    python examples/fashion_cnn.py --gradient frog                          # weight perturbation, jvp
    python examples/fashion_cnn.py --gradient frog --perturbation activity  # the paper's protocol

The optimizer, the scheduler and their settings stay as they are for backprop: frog's estimate has
the gradient's expected length by default (``scale_correction=True``). Data: the Debian package
dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) or --data-dir with the four IDX files.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

import frog
from frog.training.data import Split, batches, load_dataset


class Net(nn.Module):
    """Images (B, 1, 28, 28) -> log-probabilities (B, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = self.dropout1(F.max_pool2d(x, 2)).flatten(1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


def evaluate(model: nn.Module, split: Split) -> tuple[float, float]:
    """Mean loss and accuracy on ``split``."""
    model.eval()
    with torch.no_grad():
        output = model(split.x)
    model.train()
    return F.nll_loss(output, split.y).item(), (output.argmax(1) == split.y).float().mean().item()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fashion-MNIST CNN with Adadelta + StepLR, backprop or frog")
    parser.add_argument("--gradient", choices=["bp", "frog"], default="frog")
    parser.add_argument("--perturbation", choices=["weight", "activity"], default="weight")
    parser.add_argument("--engine", choices=frog.ENGINES, default="jvp")
    parser.add_argument("-k", "--tangents", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--train-size", type=int, default=60000, help="use the first N training images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    return parser.parse_args(argv)


def training(args: argparse.Namespace) -> Iterator[dict]:
    """Train as ``args`` say; yields {"test_loss", "test_accuracy"} before training and after every
    epoch, and {"step", "loss", "seconds"} after every step."""
    torch.manual_seed(args.seed)
    data = load_dataset("fashion-mnist", args.data_dir)
    train = Split(data.train.x[: args.train_size], data.train.y[: args.train_size])
    test = Split(data.test.x[:1000], data.test.y[:1000])
    model = Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=args.gamma)
    fg = frog.ForwardGradient(args.tangents, engine=args.engine, perturbation=args.perturbation, seed=args.seed)
    reduction = "none" if args.perturbation == "activity" else "mean"  # activity perturbation: per-sample losses

    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad()
        if args.gradient == "bp":
            loss = F.nll_loss(model(x), y)
            loss.backward()
        else:
            loss = fg.fill_grad(model, lambda m: F.nll_loss(m(x), y, reduction=reduction))  # instead of backward()
        optimizer.step()
        return loss

    yield dict(zip(("test_loss", "test_accuracy"), evaluate(model, test), strict=True))
    generator = torch.Generator().manual_seed(args.seed)
    step = 0
    for _ in range(args.epochs):
        for x, y in batches(train, args.batch_size, shuffle=True, generator=generator):
            start = time.perf_counter()
            loss = train_step(x, y).item()
            step += 1
            yield {"step": step, "loss": loss, "seconds": time.perf_counter() - start}
            if step == args.steps:
                break
        scheduler.step()
        yield dict(zip(("test_loss", "test_accuracy"), evaluate(model, test), strict=True))
        if step == args.steps:
            return


def main(argv: list[str] | None = None) -> list[dict]:
    records = []
    for record in training(parse(argv)):
        if "step" in record:
            print(f"step {record['step']}: loss {record['loss']:.4f}  {1e3 * record['seconds']:.0f} ms", flush=True)
        else:
            print(f"test loss {record['test_loss']:.4f}, accuracy {record['test_accuracy']:.3f}", flush=True)
        records.append(record)
    return records


if __name__ == "__main__":
    main()
