"""Quantizing with no calibration data gave all-zero outputs and only a warning
(https://github.com/pytorch/pytorch/issues/123824)."""

import torch
import torch.nn as nn

torch.manual_seed(0)

m = nn.Sequential(nn.Linear(5, 5)).eval()
x = torch.rand(1, 5)
calib_empty = []  # quantize pass is handed zero calibration batches
calib_ok = [torch.rand(16, 5) for _ in range(4)]
# expected: quantize(m, calib_empty) raises an error naming the uncalibrated tensors;
#           quantize(m, calib_ok)(x) is within 0.05 (a few int8 steps) of m(x)
