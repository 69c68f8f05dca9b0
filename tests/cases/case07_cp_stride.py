"""CP decomposition put the conv's stride (and dilation) on the 1x1 factors too, which shrank
the output (https://github.com/jacobgil/pytorch-tensor-decompositions/issues/2)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)

conv = nn.Conv2d(3, 64, 11, stride=4, padding=2).eval()  # AlexNet conv1: 3x224x224 -> 64x55x55
x = torch.randn(1, 3, 224, 224)
conv2 = nn.Conv2d(16, 32, (3, 5), stride=2, padding=(2, 4), dilation=2).eval()  # second input
x2 = torch.randn(1, 16, 33, 40)  # -> 32x17x20


def effective_kernel(seq):
    """The dense kernel of a CP chain 1x1 -> (kh x 1, dw) -> (1 x kw, dw) -> 1x1."""
    B, Cv = seq[0].weight[:, :, 0, 0], seq[1].weight[:, 0, :, 0]
    D, A = seq[2].weight[:, 0, 0, :], seq[3].weight[:, :, 0, 0]
    return torch.einsum('or,ri,rh,rw->oihw', A, B, Cv, D)


def cp_oracle(seq, conv, x):  # what the chain must compute, whatever the rank
    return F.conv2d(x, effective_kernel(seq), seq[3].bias, conv.stride, conv.padding,
                    conv.dilation)
