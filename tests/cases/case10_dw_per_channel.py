"""Depthwise filters whose ranges span 1000x: per-tensor int8 zeroed 4 of 16 filters and
accuracy collapsed (https://github.com/Edgecortix-Inc/pytorch_quantization/pull/5)."""

import torch
import torch.nn as nn

torch.manual_seed(0)

dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
with torch.no_grad():  # per-filter ranges span 1000x (typical after BN folding)
    dw.weight.mul_(torch.logspace(-3, 0, 16).view(16, 1, 1, 1))
m = nn.Sequential(dw, nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()
x = torch.randn(4, 16, 8, 8)


def per_channel_rel_err(w_deq, w):  # oracle on the int8 weights the pass emits for m[0]
    return ((w_deq - w).flatten(1).norm(dim=1) / w.flatten(1).norm(dim=1))
