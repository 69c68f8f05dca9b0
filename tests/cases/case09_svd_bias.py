"""SVD replacement of a Linear layer dropped its bias
(https://github.com/shadowpa0327/Palu/pull/8)."""

import torch
import torch.nn as nn

torch.manual_seed(0)

lin = nn.Linear(64, 48).eval()
with torch.no_grad():
    lin.bias.uniform_(-2, 2)  # large bias: dropping it is unmistakable
lin_nb = nn.Linear(64, 48, bias=False).eval()  # control: must stay bias-free
x = torch.randn(8, 64)
U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)


def svd_reference(x, r):  # what a rank-r replacement of `lin` must compute
    return x @ (U[:, :r] * S[:r] @ Vh[:r]).T + lin.bias
