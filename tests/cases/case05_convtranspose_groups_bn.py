"""Batch-norm folding into a grouped ConvTranspose2d broadcast the scale over the wrong weight
axis: a crash, or silently wrong weights (https://github.com/pytorch/pytorch/issues/180995)."""

import torch
import torch.nn as nn

torch.manual_seed(0)


def make(groups):  # groups=2 is the failing input, groups=1 the control
    m = nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=groups,
                           bias=False),
        nn.BatchNorm2d(6)).eval()  # ConvTranspose weight layout: [in=4, out/groups, 3, 3]
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(.5, 2)
        m[1].weight.uniform_(.5, 2)
        m[1].bias.uniform_(-1, 1)
    return m


x = torch.randn(2, 4, 5, 5)  # output 2x6x10x10
