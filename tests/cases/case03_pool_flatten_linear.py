"""AdaptiveAvgPool(5, 5) -> Flatten -> Linear: each channel is 25 features, and a pruning tool
removed one feature per channel (https://github.com/VainF/Torch-Pruning/issues/511)."""

import copy

import torch
import torch.nn as nn

torch.manual_seed(0)

m = nn.Sequential(
    nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    nn.AdaptiveAvgPool2d((5, 5)), nn.Flatten(),  # every channel becomes 25 consecutive features
    nn.Linear(16 * 25, 10)).eval()
x = torch.randn(2, 3, 32, 32)  # also 64x64: the pooled map and the Linear width stay the same


def masked_reference(m, P):  # P = conv channels removed
    r = copy.deepcopy(m)
    cols = torch.tensor([c * 25 + k for c in P for k in range(25)])
    with torch.no_grad():
        r[5].weight[:, cols] = 0
    return r
