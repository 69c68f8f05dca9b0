"""A tensor concatenated with itself feeds a 1x1 conv. After pruning, a pruning tool gave the
consumer the wrong input width (https://github.com/VainF/Torch-Pruning/issues/146)."""

import copy

import torch
import torch.nn as nn

torch.manual_seed(0)


class SelfCat(nn.Module):  # C = 8; one tensor is concatenated with itself
    def __init__(self, c=8):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.GELU(),
                               nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.b = nn.Sequential(nn.Conv2d(2 * c, c, 1), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.a(x)
        return self.b(torch.cat([y, y], dim=1))  # b[0] reads channel i at positions i and i+C


m, x = SelfCat().eval(), torch.randn(1, 8, 7, 7)


def masked_reference(m, P):  # P = channels removed from a[3]; same function, no removal
    r = copy.deepcopy(m)
    cols = torch.tensor(list(P) + [p + 8 for p in P])
    with torch.no_grad():
        r.b[0].weight[:, cols] = 0
    return r
