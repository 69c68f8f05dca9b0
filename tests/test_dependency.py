"""Tests of the coupled-channel analysis (graphcomp.dependency) on small PyTorch models.

Each test imports a module with the PyTorch frontend and checks which positions the analysis
puts in one unit, which groups it finds and which it marks as unprunable (and why).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphcomp.dependency import analyze_channels, reshape_block
from graphcomp.frontends.torch_frontend import import_torch
from graphcomp.ir import Graph, Node, Value
from graphcomp.ops import register_op, unregister_op


def imported(module: nn.Module, *shapes) -> Graph:
    torch.manual_seed(0)
    inputs = tuple(torch.randn(*shape) for shape in shapes)
    return import_torch(module.eval(), inputs)


def output_of(graph: Graph, node_name: str) -> Value:
    return graph.node(node_name).outputs[0]


def units_of(analysis, value: Value) -> np.ndarray:
    """The unit index (within its group) of each channel position of ``value``."""
    return analysis.unit_index(value)[1]


# --- case: a tensor concatenated with itself -----------------------------------------------------


class SelfCat(nn.Module):
    # x -> a (conv, bn, gelu, conv, bn) -> y;  b (conv 16 -> 8, bn) reads concat(y, y)
    def __init__(self, c: int = 8):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.GELU(),
                               nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.b = nn.Sequential(nn.Conv2d(2 * c, c, 1), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.a(x)
        return self.b(torch.cat([y, y], dim=1))


def test_self_concat_unit_has_both_copies():
    graph = imported(SelfCat(), (1, 8, 7, 7))
    analysis = analyze_channels(graph)
    group = analysis.group_of(output_of(graph, "a.3"))
    concat_units = units_of(analysis, output_of(graph, "cat"))

    assert group.units == 8
    assert group.prunable
    assert set(group.nodes) == {"a.3", "a.4", "cat"}
    np.testing.assert_array_equal(concat_units, np.tile(np.arange(8), 2))
    assert analysis.group_of(output_of(graph, "cat"), 9) is group


def test_graph_output_group_is_fixed():
    graph = imported(SelfCat(), (1, 8, 7, 7))
    group = analyze_channels(graph).group_of(output_of(graph, "b.0"))

    assert not group.prunable
    assert "graph output" in group.fixed


# --- case: adaptive pooling, flatten and linear -------------------------------------------------


def pool_flatten_linear() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d((5, 5)), nn.Flatten(), nn.Linear(16 * 25, 10))


@pytest.mark.parametrize("size", [32, 64])
def test_flatten_ties_channel_to_its_pooled_block(size):
    graph = imported(pool_flatten_linear(), (2, 3, size, size))
    analysis = analyze_channels(graph)
    conv_group = analysis.group_of(output_of(graph, "0"))
    flat = graph.node("5").inputs[0]

    assert conv_group.units == 16
    assert flat.shape == (2, 400)
    np.testing.assert_array_equal(units_of(analysis, flat), np.repeat(np.arange(16), 25))
    assert analysis.group_of(flat) is conv_group


# --- residual adds, squeeze-excitation, depthwise and grouped convs ------------------------------


class ResidualSE(nn.Module):
    # x -> stem -> s;  s -> dw -> pw -> p;  se = sigmoid(fc2(relu(fc1(gap(p)))));  y = s + p * se
    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw = nn.Conv2d(c, c, 1)
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        s = F.relu(self.stem(x))
        p = self.pw(self.dw(s))
        se = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(p, 1)))))
        return self.head(s + p * se)


def test_residual_add_and_se_tie_branches():
    graph = imported(ResidualSE(), (1, 3, 8, 8))
    analysis = analyze_channels(graph)
    stem = analysis.group_of(output_of(graph, "stem"))

    assert analysis.group_of(output_of(graph, "pw")) is stem
    assert analysis.group_of(output_of(graph, "fc2")) is stem
    assert analysis.group_of(output_of(graph, "dw")) is stem
    assert set(stem.layers) == {"stem", "dw", "pw", "fc2"}
    assert stem.units == 8
    assert analysis.group_of(output_of(graph, "fc1")) is not stem


def test_depthwise_multiplier_ties_input_to_its_outputs():
    module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, groups=4), nn.Conv2d(8, 2, 1))
    graph = imported(module, (1, 3, 6, 6))
    analysis = analyze_channels(graph)

    np.testing.assert_array_equal(units_of(analysis, output_of(graph, "1")),
                                  np.repeat(np.arange(4), 2))
    assert analysis.group_of(output_of(graph, "1")).units == 4


def test_grouped_conv_ties_same_index_of_every_group():
    module = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 1, groups=2), nn.Conv2d(6, 2, 1))
    graph = imported(module, (1, 3, 4, 4))
    analysis = analyze_channels(graph)

    np.testing.assert_array_equal(units_of(analysis, output_of(graph, "0")),
                                  np.tile(np.arange(4), 2))
    np.testing.assert_array_equal(units_of(analysis, output_of(graph, "1")),
                                  np.tile(np.arange(3), 2))


def test_conv_transpose_and_resize_pass_channels():
    module = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ConvTranspose2d(6, 4, 2, stride=2),
                           nn.Upsample(scale_factor=2), nn.Conv2d(4, 2, 1))
    graph = imported(module, (1, 3, 4, 4))
    analysis = analyze_channels(graph)
    transposed = analysis.group_of(output_of(graph, "1"))

    assert analysis.group_of(output_of(graph, "0")).units == 6
    assert transposed.units == 4
    assert analysis.group_of(output_of(graph, "2")) is transposed


# --- attention heads and FFN neurons --------------------------------------------------------------


class Attention(nn.Module):
    # x[B, S, 16] -> q, k, v -> [B, heads=4, S, 4] -> sdpa -> [B, S, 16] -> out -> + x
    def __init__(self, width: int = 16, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(
            width, width)
        self.out = nn.Linear(width, width)
        self.ffn_in, self.ffn_out = nn.Linear(width, 32), nn.Linear(32, width)

    def forward(self, x):
        batch, length, width = x.shape

        def split(t):
            return t.reshape(batch, length, self.heads, width // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = x + self.out(a.transpose(1, 2).reshape(batch, length, width))
        return x + self.ffn_out(F.gelu(self.ffn_in(x)))


def test_attention_heads_are_units():
    graph = imported(Attention(), (2, 5, 16))
    analysis = analyze_channels(graph)
    heads = analysis.group_of(output_of(graph, "q"))

    assert heads.units == 4
    assert heads.unit_width == 4
    assert set(heads.layers) == {"q", "k", "v"}
    np.testing.assert_array_equal(units_of(analysis, output_of(graph, "k")),
                                  np.repeat(np.arange(4), 4))
    assert analysis.group_of(graph.node("out").inputs[0]) is heads


def test_ffn_neurons_are_one_group():
    graph = imported(Attention(), (2, 5, 16))
    analysis = analyze_channels(graph)
    ffn = analysis.group_of(output_of(graph, "ffn_in"))

    assert ffn.units == 32
    assert ffn.prunable
    assert analysis.group_of(graph.node("ffn_out").inputs[0]) is ffn
    # The residual stream reaches the graph output.
    assert not analysis.group_of(output_of(graph, "out")).prunable


def test_layer_norm_over_channels_is_recorded():
    module = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    graph = imported(module, (3, 4))
    group = analyze_channels(graph).group_of(output_of(graph, "0"))

    assert group.prunable
    assert group.normalized_by == ("1",)


# --- what stays whole ---------------------------------------------------------------------------


def test_add_with_graph_input_fixes_group():
    class AddInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.head(self.conv(x) + x)

    graph = imported(AddInput(), (1, 3, 4, 4))
    group = analyze_channels(graph).group_of(output_of(graph, "conv"))

    assert not group.prunable
    assert "cannot be removed" in group.fixed


def test_softmax_over_channels_fixes_group_with_warning(caplog):
    class ChannelSoftmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.head(torch.softmax(self.conv(x), dim=1))

    graph = imported(ChannelSoftmax(), (1, 3, 4, 4))
    with caplog.at_level(logging.WARNING, logger="graphcomp.dependency"):
        group = analyze_channels(graph).group_of(output_of(graph, "conv"))

    assert not group.prunable
    assert "softmax" in caplog.text
    assert "normalizes over the channel dim" in group.fixed


@pytest.fixture
def channel_mixer_op():
    """A test-only op that flips the channels, registered for one test and then removed so the
    registry-coverage tests of other files never see it."""
    name = "test_channel_mixer"
    register_op(name, infer=lambda node: [(node.inputs[0].shape, node.inputs[0].dtype)],
                torch=lambda node, x: x.flip(1), relax=lambda node, x: x,
                doc="flips the channels; the dependency tests use it as an unknown op")
    yield name
    unregister_op(name)


def test_unknown_op_fixes_group_and_warns(caplog, channel_mixer_op):
    op = channel_mixer_op
    graph = imported(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)),
                     (1, 3, 4, 4))
    relu = graph.node("1")
    mixed = Value("mixed", relu.outputs[0].shape)
    graph.nodes.insert(graph.nodes.index(relu) + 1, Node("mixer", op, [relu.outputs[0]], [mixed]))
    graph.node("2").inputs[0] = mixed

    with caplog.at_level(logging.WARNING, logger="graphcomp.dependency"):
        group = analyze_channels(graph).group_of(output_of(graph, "0"))

    assert not group.prunable
    assert f"node 'mixer' (op {op})" in caplog.text
    assert "no channel rule" in group.fixed


# --- reshape blocks -------------------------------------------------------------------------------


@pytest.mark.parametrize("in_shape, out_shape, axis, expected", [
    ((2, 16, 5, 5), (2, 400), 1, ([1, 2, 3], [1])),
    ((1, 32, 384), (1, 32, 12, 32), 2, ([2], [2, 3])),
    ((1, 32, 12, 32), (1, 32, 384), 2, ([2, 3], [2])),
    ((4, 6), (24,), 1, ([0, 1], [0])),
    ((1, 8, 1, 1), (1, 8), 1, ([1], [1])),
])
def test_reshape_block(in_shape, out_shape, axis, expected):
    in_axes, out_axes = reshape_block(in_shape, out_shape, axis)
    # Size-1 dims may join a block on either side without changing the mapping.
    assert [k for k in in_axes if in_shape[k] > 1] == expected[0]
    assert [k for k in out_axes if out_shape[k] > 1] == expected[1]
