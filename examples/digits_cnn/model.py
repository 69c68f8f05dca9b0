"""The digits CNN and its data: scikit-learn's 8x8 handwritten digits, split 80/20.

Shared by ``train.py`` (which writes the weights) and ``graphcomp.models`` (which loads them),
so both use the same network and the same held-out split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

TEST_FRACTION = 0.2
SPLIT_SEED = 0


class DigitsCNN(nn.Module):
    """Two 3x3 conv + batch norm + ReLU blocks, 2x2 max pooling, then two linear layers.

    Input: [N, 1, 8, 8] pixel intensities scaled to [0, 1]. Output: [N, 10] logits.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The argument is named like the "input" key of graphcomp.models.digits_data(), because
        # the imported graph names its input after it.
        x = self.relu1(self.bn1(self.conv1(input)))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        return self.fc2(self.relu3(self.fc1(x)))


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (train images, train labels, test images, test labels).

    Images are float32 [N, 1, 8, 8] scaled from 0..16 to [0, 1]; labels are int64. The split
    is stratified and seeded, so it is the same on every run.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    return x_train, y_train, x_test, y_test
