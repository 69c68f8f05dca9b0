"""The PyTorch frontend: small modules per op family, compared with the module's own output.

Tolerance: 1e-5 absolute. The reference executor runs the same PyTorch kernels on the same
float32 data, so most outputs agree to 1e-7. Attention, which the frontend decomposes into
matmul and softmax, is held to the same 1e-5.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphcomp import executor
from graphcomp.errors import (
    GraphcompError, ModelLoadError, ShapeError, UnsupportedOpError,
)
from graphcomp.frontends.torch_frontend import import_torch, load_pt2
from graphcomp.ir import Constant

ATOL = 1e-5


def randomize_batch_norm(module: nn.Module, seed: int = 0) -> None:
    """Give every batch norm non-trivial statistics and affine parameters, so a wrong import
    of batch norm cannot pass as identity."""
    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            channels = layer.num_features
            with torch.no_grad():
                layer.running_mean.copy_(torch.randn(channels, generator=generator))
                layer.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
                layer.weight.copy_(torch.randn(channels, generator=generator))
                layer.bias.copy_(torch.randn(channels, generator=generator))


def import_and_compare(module: nn.Module, *inputs: torch.Tensor, atol: float = ATOL):
    """Import ``module`` at ``inputs``, run the graph on the same inputs, compare every output
    with the module's; return the graph."""
    module.eval()
    graph = import_torch(module, inputs)
    feeds = {value.name: tensor.numpy() for value, tensor in zip(graph.inputs, inputs)}
    results = executor.run(graph, feeds)
    with torch.no_grad():
        expected = module(*inputs)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    assert len(results) == len(expected)
    for value, reference in zip(graph.outputs, expected):
        got = results[value.name]
        assert got.shape == tuple(reference.shape), value.name
        assert got.dtype == reference.numpy().dtype, value.name
        np.testing.assert_allclose(got, reference.numpy(), rtol=0, atol=atol, err_msg=value.name)
    return graph


def op_counts(graph) -> Counter:
    return Counter(node.op for node in graph.nodes)


def seeded(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- convolution, batch norm, activations -----------------------------------------------------


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def test_conv_bn_relu_matches_module():
    torch.manual_seed(0)
    module = ConvBnRelu()
    randomize_batch_norm(module)
    graph = import_and_compare(module, seeded(2, 3, 8, 8))
    assert [node.op for node in graph.nodes] == ["conv2d", "batch_norm", "relu"]
    assert [node.name for node in graph.nodes] == ["conv", "bn", "act"]
    assert graph.metadata == {"source": "ConvBnRelu", "frontend": "torch"}


@pytest.mark.parametrize(
    "stride, padding, dilation, groups",
    [(1, 1, 1, 16), (2, 1, 1, 16), (1, 2, 2, 16), (2, 0, 1, 4), (1, "same", 1, 16),
     (1, "valid", 1, 1)],
)
def test_depthwise_and_grouped_conv(stride, padding, dilation, groups):
    torch.manual_seed(0)
    module = nn.Conv2d(16, 16, 3, stride=stride, padding=padding, dilation=dilation,
                       groups=groups)
    graph = import_and_compare(module, seeded(1, 16, 9, 9))
    assert graph.nodes[0].attrs["groups"] == groups


def test_same_padding_with_even_kernel_is_asymmetric():
    torch.manual_seed(0)
    module = nn.Conv2d(4, 6, (4, 2), padding="same")
    graph = import_and_compare(module, seeded(1, 4, 7, 7))
    assert graph.nodes[0].attrs["pads"] == [1, 0, 2, 1]


@pytest.mark.parametrize(
    "stride, padding, output_padding, groups", [(2, 0, 0, 1), (2, 1, 1, 1), (3, 1, 2, 2)]
)
def test_conv_transpose(stride, padding, output_padding, groups):
    torch.manual_seed(0)
    module = nn.ConvTranspose2d(4, 6, 3, stride=stride, padding=padding,
                                output_padding=output_padding, groups=groups)
    graph = import_and_compare(module, seeded(1, 4, 5, 5))
    assert op_counts(graph) == Counter({"conv_transpose2d": 1})


def test_conv1d_runs_as_conv2d():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv1d(3, 5, 3, stride=2, padding=1), nn.ConvTranspose1d(5, 2, 2))
    graph = import_and_compare(module, seeded(2, 3, 11))
    assert op_counts(graph)["conv2d"] == 1
    assert op_counts(graph)["conv_transpose2d"] == 1


class Activations(nn.Module):
    def forward(self, x):
        return (F.gelu(x), F.gelu(x, approximate="tanh"), torch.sigmoid(x), torch.tanh(x),
                F.hardswish(x), F.hardsigmoid(x), F.relu6(x), F.silu(x), x.clamp(-0.5, 0.7),
                torch.clamp_min(x, 0.1))


def test_activations():
    graph = import_and_compare(Activations(), seeded(2, 5, 4) * 4)
    assert op_counts(graph)["clip"] == 3


# --- linear and matmul ------------------------------------------------------------------------


class LinearFamily(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.weight = nn.Parameter(torch.randn(6, 3))

    def forward(self, x, y):
        a = self.fc(x)                                        # linear on a 3-D input
        b = x @ self.weight                                   # matmul with a weight: linear
        c = torch.bmm(x, y)                                   # batched matmul of two inputs
        d = torch.addmm(self.fc.bias, x[0], self.fc.weight.t(), beta=0.5, alpha=2.0)
        return a, b, c, d


def test_linear_matmul_addmm():
    torch.manual_seed(0)
    graph = import_and_compare(LinearFamily(), seeded(2, 5, 6), seeded(2, 6, 7, seed=1))
    counts = op_counts(graph)
    assert counts["linear"] == 3
    assert counts["matmul"] == 1


# --- attention --------------------------------------------------------------------------------


class AttentionBlock(nn.Module):
    """Self-attention as transformer encoders write it: projections, heads, SDPA, output."""

    def __init__(self, dim=16, heads=4, causal=False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, mask=None):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=-1)
        shape = (batch, tokens, self.heads, dim // self.heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        y = y.transpose(1, 2).reshape(batch, tokens, dim)
        return self.norm(x + self.out(y))


def test_attention_with_boolean_mask_input():
    torch.manual_seed(0)
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[1, ..., 4:] = False                                  # the second sequence is padded
    graph = import_and_compare(AttentionBlock(), seeded(2, 6, 16), keep)
    assert "scaled_dot_product_attention" not in op_counts(graph)
    assert op_counts(graph)["softmax"] == 1
    assert op_counts(graph)["where"] == 1


def test_attention_mask_stays_an_input():
    """The graph imported with one mask must give the module's result for another mask."""
    torch.manual_seed(0)
    module = AttentionBlock().eval()
    x = seeded(2, 6, 16)
    graph = import_and_compare(module, x, torch.ones(2, 1, 1, 6, dtype=torch.bool))
    other = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    other[0, ..., 2:] = False
    result = executor.run(graph, {"x": x.numpy(), "mask": other.numpy()})["output"]
    with torch.no_grad():
        expected = module(x, other).numpy()
    np.testing.assert_allclose(result, expected, rtol=0, atol=ATOL)


def test_attention_with_float_mask_and_causal():
    torch.manual_seed(0)
    additive = seeded(1, 4, 5, 5, seed=3)
    import_and_compare(AttentionBlock(), seeded(1, 5, 16), additive)
    graph = import_and_compare(AttentionBlock(causal=True), seeded(2, 5, 16))
    causal = [c for c in graph.constants() if c.name.endswith("causal_mask")]
    assert len(causal) == 1
    np.testing.assert_array_equal(causal[0].data, np.tril(np.ones((5, 5), bool)))


# --- normalization, embedding, pooling --------------------------------------------------------


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.affine = nn.LayerNorm(8, eps=1e-6)
        self.plain = nn.LayerNorm([4, 8], elementwise_affine=False)

    def forward(self, x):
        return self.affine(x), self.plain(x), torch.softmax(x, dim=1)


def test_layer_norm_and_softmax():
    torch.manual_seed(0)
    with torch.no_grad():
        module = Norms()
        module.affine.weight.normal_()
        module.affine.bias.normal_()
    graph = import_and_compare(module, seeded(3, 4, 8))
    norms = [node for node in graph.nodes if node.op == "layer_norm"]
    assert [node.attrs["axis"] for node in norms] == [2, 1]
    assert norms[0].attrs["eps"] == 1e-6


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(50, 8, padding_idx=0)
        self.positions = nn.Embedding(16, 8)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.tokens(ids) + self.positions(positions)


def test_embedding_with_folded_positions():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    graph = import_and_compare(Embedder(), ids)
    # The position lookup depends only on shapes, so it folds into one constant.
    assert op_counts(graph) == Counter({"embedding": 1, "add": 1})
    folded = graph.nodes[1].inputs[1]
    assert isinstance(folded, Constant)
    assert folded.shape == (1, 7, 8)


class Pools(nn.Module):
    def forward(self, x):
        return (
            F.max_pool2d(x, 3, stride=2, padding=1),
            F.max_pool2d(x, 2, ceil_mode=True),
            F.avg_pool2d(x, 3, stride=2, padding=1),
            F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False),
            F.adaptive_avg_pool2d(x, 1),
            F.adaptive_avg_pool2d(x, (3, 3)),
            x.mean(dim=(2, 3)),
            x.sum(dim=1, keepdim=True),
            x.amax(dim=-1),
            torch.linalg.vector_norm(x, dim=1),
        )


def test_pooling_and_reductions():
    graph = import_and_compare(Pools(), seeded(2, 3, 9, 9))
    counts = op_counts(graph)
    assert counts["max_pool2d"] == 2
    assert counts["avg_pool2d"] == 2
    assert counts["adaptive_avg_pool2d"] == 2


# --- data movement ----------------------------------------------------------------------------


class Movement(nn.Module):
    def forward(self, x, y):
        joined = torch.cat([x, y], dim=1)                     # [2, 7, 4]
        first, second = joined.split([3, 4], dim=1)
        chunks = joined.chunk(2, dim=-1)
        row = joined[:, 2]                                    # select
        every_other = joined[:, 1:6:2, 1:]                    # slice with steps
        picked = joined[:, [0, 2, 2], :]                      # index with a constant list
        stacked = torch.stack([x, x], dim=0)
        rows = torch.unbind(y, dim=1)
        flipped = joined.permute(2, 0, 1).flatten(1).unsqueeze(0)
        return (first * 2, second.transpose(1, 2), chunks[1], row, every_other, picked,
                stacked, rows[2], flipped, F.pad(x, (1, 2)))


def test_cat_split_slice_select_index():
    graph = import_and_compare(Movement(), seeded(2, 3, 4), seeded(2, 4, 4, seed=1))
    counts = op_counts(graph)
    assert counts["concat"] == 2
    assert counts["split"] >= 2
    assert counts["slice"] >= 2
    assert counts["gather"] == 1
    assert counts["pad"] == 1


class Gather(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("order", torch.tensor([[2, 0, 1], [1, 1, 0]]))

    def forward(self, x, index):
        return torch.gather(x, 1, self.order), x.index_select(1, index), x[:, index]


def test_gather_with_constant_and_input_indices():
    x = seeded(2, 3)
    graph = import_and_compare(Gather(), x, torch.tensor([2, 0]))
    assert op_counts(graph)["gather"] == 3


# --- elementwise: scalars, dtypes, comparisons, folding ---------------------------------------


class Arithmetic(nn.Module):
    def forward(self, x, counts):
        scaled = (x * 2 + 1) / 3 - 0.5
        ratio = counts / 4                                    # int64 / int -> float32
        shifted = counts + 1                                  # stays int64
        mixed = x + counts.unsqueeze(-1)                      # int64 promotes to float32
        mask = (x > 0) & (x <= 1) | (x == 0.5)
        chosen = torch.where(mask, x, torch.zeros_like(x))
        filled = x.masked_fill(x < -1, -5.0)
        powered = x.abs() ** 1.5 + torch.rsub(x, 3, alpha=2)
        return scaled, ratio, shifted, mixed, mask, chosen, filled, powered, (x != 0).float()


def test_scalars_dtypes_and_comparisons():
    x = seeded(2, 5)
    counts = torch.tensor([3, 7], dtype=torch.int64)
    graph = import_and_compare(Arithmetic(), x, counts)
    scalars = [c for c in graph.constants() if c.rank == 0]
    assert scalars
    assert {c.dtype for c in scalars} <= {"float32", "int64"}
    dtypes = [value.dtype for value in graph.outputs]
    assert dtypes == ["float32", "float32", "int64", "float32", "bool", "float32", "float32",
                      "float32", "float32"]


class ShapeOnly(nn.Module):
    def forward(self, x):
        steps = torch.arange(x.shape[-1], dtype=torch.float32)
        ones = torch.ones(x.shape[0], 1)
        return x * steps + ones + torch.full_like(x, 2.0)


def test_shape_only_computation_folds():
    graph = import_and_compare(ShapeOnly(), seeded(3, 4))
    assert op_counts(graph) == Counter({"mul": 1, "add": 2})
    assert all(isinstance(node.inputs[1], Constant) for node in graph.nodes)


def test_dead_code_and_dropout_are_dropped():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            self.unused(x)
            return self.drop(self.used(x))

    graph = import_and_compare(Unused(), seeded(2, 4))
    assert [node.name for node in graph.nodes] == ["used"]


# --- API: names, ExportedProgram, pt2 files ---------------------------------------------------


def test_input_and_output_names():
    module = nn.Linear(4, 2).eval()
    graph = import_torch(module, (seeded(1, 4),))
    assert [v.name for v in graph.inputs] == ["input"]
    assert [v.name for v in graph.outputs] == ["output"]
    graph = import_torch(module, (seeded(1, 4),), input_names=["features"],
                         output_names=["logits"], name="head")
    assert [v.name for v in graph.inputs] == ["features"]
    assert [v.name for v in graph.outputs] == ["logits"]
    assert graph.name == "head"
    assert graph.metadata["source"] == "head"


def test_output_that_is_an_input_gets_a_node():
    class PassThrough(nn.Module):
        def forward(self, x):
            y = x + 1
            return x, y, y

    graph = import_and_compare(PassThrough(), seeded(2, 2))
    assert [v.name for v in graph.outputs] == ["output_0", "output_1", "output_2"]
    assert op_counts(graph) == Counter({"identity": 2, "add": 1})


def test_exported_program_and_pt2_file(tmp_path):
    torch.manual_seed(0)
    module = ConvBnRelu()
    randomize_batch_norm(module)
    module.eval()
    x = seeded(1, 3, 8, 8)
    program = torch.export.export(module, (x,), strict=False)
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    graph = import_torch(load_pt2(path), name="model")
    result = executor.run(graph, {"x": x.numpy()})["output"]
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(result, expected, rtol=0, atol=ATOL)
    assert graph.name == "model"


def test_decomposed_program_imports():
    """Core ATen forms (convolution, addmm, native batch and layer norm) convert too."""
    torch.manual_seed(0)
    module = nn.Sequential(ConvBnRelu(), nn.Flatten(), nn.Linear(512, 10), nn.LayerNorm(10))
    randomize_batch_norm(module)
    module.eval()
    x = seeded(2, 3, 8, 8)
    program = torch.export.export(module, (x,), strict=False).run_decompositions()
    graph = import_torch(program)
    result = executor.run(graph, {"input": x.numpy()})["output"]
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(result, expected, rtol=0, atol=ATOL)
    assert {"conv2d", "batch_norm", "linear", "layer_norm"} <= set(op_counts(graph))


# --- bad input --------------------------------------------------------------------------------


def test_training_mode_is_rejected():
    module = ConvBnRelu().train()
    with pytest.raises(GraphcompError, match=r"training mode .*call model\.eval\(\)"):
        import_torch(module, (seeded(1, 3, 8, 8),))


def test_program_exported_in_training_mode_is_rejected():
    module = ConvBnRelu().train()
    program = torch.export.export(module, (seeded(2, 3, 8, 8),), strict=False)
    with pytest.raises(GraphcompError, match=r"call model\.eval\(\)"):
        import_torch(program)


def test_submodule_in_training_mode_is_rejected():
    module = ConvBnRelu().eval()
    module.bn.train()
    with pytest.raises(GraphcompError, match="modules bn"):
        import_torch(module, (seeded(1, 3, 8, 8),))


def test_failed_export_names_model():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:                                   # control flow on tensor data
                return x
            return -x

    with pytest.raises(GraphcompError, match="torch.export failed for model 'DataDependent'"):
        import_torch(DataDependent().eval(), (seeded(4),))


def test_unsupported_ops_reported_together():
    class Exotic(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1) + torch.flip(x, [1]) + torch.cumsum(x * 2, 1)

    with pytest.raises(UnsupportedOpError) as info:
        import_torch(Exotic().eval(), (seeded(2, 3),))
    ops = {op: names for op, _, names in info.value.unsupported}
    assert set(ops) == {"aten.cumsum.default", "aten.flip.default"}
    assert ops["aten.cumsum.default"] == ["cumsum", "cumsum_1"]
    assert "at node(s) cumsum, cumsum_1" in str(info.value)


def test_nodes_after_unsupported_op_not_reported():
    class Nonzero(nn.Module):
        def forward(self, x):
            return torch.nonzero(x).float().sum() + x.sum()

    with pytest.raises(UnsupportedOpError) as info:
        import_torch(Nonzero().eval(), (seeded(5),))
    assert [op for op, _, _ in info.value.unsupported] == ["aten.nonzero.default"]


def test_missing_example_inputs():
    with pytest.raises(GraphcompError, match="example_inputs are required"):
        import_torch(nn.Linear(2, 2).eval())


def test_wrong_number_of_input_names():
    with pytest.raises(GraphcompError, match="1 tensor inputs .* but 2 input names"):
        import_torch(nn.Linear(2, 2).eval(), (seeded(1, 2),), input_names=["a", "b"])


def test_dynamic_shapes_are_rejected():
    module = nn.Linear(3, 2).eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, (seeded(4, 3),), dynamic_shapes=({0: batch},),
                                  strict=False)
    with pytest.raises(ShapeError, match="dynamic dim .* export without dynamic_shapes"):
        import_torch(program)


def test_load_pt2_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="file not found"):
        load_pt2(tmp_path / "missing.pt2")
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip archive")
    with pytest.raises(ModelLoadError, match="not a valid torch.export program"):
        load_pt2(garbage)
