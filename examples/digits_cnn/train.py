"""Train the digits CNN and write its weights next to this script.

    python examples/digits_cnn/train.py [--epochs 30] [--seed 0]

Writes ``digits_cnn.pth`` (the state_dict, batch-norm statistics included) and
``digits_cnn.pt2`` (``torch.export.save`` of the eval-mode model at input 1x1x8x8), then
prints the test accuracy. Takes a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from model import DigitsCNN, load_split  # noqa: E402  (imports from this folder)

WEIGHTS_FILE = HERE / "digits_cnn.pth"
PROGRAM_FILE = HERE / "digits_cnn.pt2"


def train(model: nn.Module, images: np.ndarray, labels: np.ndarray, epochs: int,
          seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = torch.from_numpy(images), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        total = 0.0
        for start in range(0, len(inputs), 64):
            batch = order[start:start + 64]
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[batch]), targets[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        schedule.step()
        if epoch % 10 == 9 or epoch == epochs - 1:
            print(f"epoch {epoch + 1}: mean training loss {total / len(inputs):.4f}")


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(dim=1).numpy()
    return float((predicted == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and batch order")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_split()
    model = DigitsCNN()
    start = time.perf_counter()
    train(model, x_train, y_train, args.epochs, args.seed)
    print(f"trained on {len(x_train)} images in {time.perf_counter() - start:.1f} s")
    print(f"test accuracy: {accuracy(model, x_test, y_test):.4f} on {len(x_test)} images")

    model.eval()
    torch.save(model.state_dict(), WEIGHTS_FILE)
    program = torch.export.export(model, (torch.zeros(1, 1, 8, 8),), strict=False)
    torch.export.save(program, PROGRAM_FILE)
    for path in (WEIGHTS_FILE, PROGRAM_FILE):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
