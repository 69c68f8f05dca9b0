"""Tests of fuse-layer-norm on small traced models, checked against PyTorch's layer norm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphcomp import executor
from graphcomp.frontends.torch_frontend import import_torch
from graphcomp.pipeline import PassManager
from graphcomp_fuse_layernorm import FuseLayerNorm, decomposed_layer_norm


class DecomposedNorm(torch.nn.Module):
    """x -> linear -> decomposed layer norm over ``axis`` -> y, with learned gamma and beta."""

    def __init__(self, features: int = 8, axis: int = -1):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.linear = torch.nn.Linear(features, features)
        self.gamma = torch.nn.Parameter(torch.rand(features, generator=generator) + 0.5)
        self.beta = torch.nn.Parameter(torch.randn(features, generator=generator))
        self.axis = axis

    def forward(self, x):
        h = self.linear(x)
        if self.axis == -1:
            return decomposed_layer_norm(h, self.gamma, self.beta, 1e-5)
        mean = h.mean(self.axis, keepdim=True)
        centered = h - mean
        variance = centered.pow(2).mean(self.axis, keepdim=True)
        return centered / torch.sqrt(variance + 1e-5) * self.gamma + self.beta


def run_pass(module, x):
    graph = import_torch(module.eval(), (x,))
    feeds = {graph.inputs[0].name: x.numpy()}
    report = PassManager([FuseLayerNorm()], feeds=feeds, tolerance=1e-5).run(graph)
    return graph, report


@pytest.mark.parametrize("shape", [(4, 8), (2, 5, 8), (2, 3, 5, 8)])
def test_fuses_to_layer_norm_equal_to_torch(shape):
    module = DecomposedNorm()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    graph, report = run_pass(module, x)

    assert "layer_norm" not in [n.op for n in graph.nodes]
    assert [n.op for n in report.graph.nodes] == ["linear", "layer_norm"]
    assert report.records[0].details == {f"layer-norm-{len(shape)}d": 1}
    with torch.no_grad():
        h = module.linear(x)
        expected = torch.nn.functional.layer_norm(h, (8,), module.gamma, module.beta, 1e-5)
    actual = executor.run(report.graph, {graph.inputs[0].name: x.numpy()})
    np.testing.assert_allclose(actual[graph.outputs[0].name], expected.numpy(),
                               rtol=1e-5, atol=1e-5)


def test_norm_over_other_axis_stays():
    module = DecomposedNorm(features=8, axis=1)
    x = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(2))
    graph, report = run_pass(module, x)
    assert report.records[0].changed is False
    assert [n.op for n in report.graph.nodes] == [n.op for n in graph.nodes]


def test_gamma_from_input_stays():
    class GammaInput(torch.nn.Module):
        def forward(self, x, gamma):
            return decomposed_layer_norm(x, gamma, torch.zeros(8), 1e-5)

    x = torch.randn(2, 3, 8)
    graph = import_torch(GammaInput().eval(), (x, torch.ones(8)))
    report = PassManager([FuseLayerNorm()], verify=False).run(graph)
    assert report.records[0].changed is False
