"""A 1-channel conv with a 1x2 kernel crashed TVM's GPU scheduling rule at build time
(https://github.com/apache/tvm/issues/20047)."""

import torch
import torch.nn as nn

torch.manual_seed(0)

cases = [((1, 1, 3, 10), (1, 2)),  # 1-channel conv, 1x2 kernel -> output 1x1x3x9
         ((1, 1, 8, 10), (1, 2)),  # same kernel, taller input
         ((2, 1, 4, 20), (3, 1))]  # control that compiled


def make(xs, k):
    m = nn.Conv2d(1, 1, k, bias=False).eval()
    return m, torch.randn(*xs)
# expected: builds for CUDA (and CPU), output equals m(x) within 1e-5
