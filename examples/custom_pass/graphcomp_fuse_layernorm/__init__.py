"""A graphcomp pass from another package: fuse decomposed layer norms into one op.

Installed, this package registers the pass ``fuse-layer-norm`` through the entry-point group
``graphcomp.passes`` (see pyproject.toml), so ``graphcomp passes`` lists it and pipelines use
it by name::

    graphcomp compile zoo:ppocr-rec --passes fold-constants,fuse,fuse-layer-norm,dce -o out/rec
"""

from __future__ import annotations

import functools

import torch

from graphcomp.ir import Constant, Graph, Node
from graphcomp.patterns import Match, RewritePass, Rule, channel_vector, pattern_from_torch

__all__ = ["FuseLayerNorm", "decomposed_layer_norm"]


def decomposed_layer_norm(x, gamma, beta, eps):
    """Layer norm over the last axis as ONNX exporters before opset 17 write it."""
    mean = x.mean(-1, keepdim=True)
    centered = x - mean
    variance = centered.pow(2).mean(-1, keepdim=True)
    return centered / torch.sqrt(variance + eps) * gamma + beta


def _fuse(rank: int):
    def rewrite(graph: Graph, match: Match) -> list[Node] | None:
        x = match["x"]
        # The traced reduce_mean has axes=[rank - 1]: the last axis only for inputs of `rank`.
        if x.rank != rank:
            return None
        gamma = channel_vector(match["gamma"], x.shape, axis=-1)
        beta = channel_vector(match["beta"], x.shape, axis=-1)
        eps: Constant = match["eps"]
        if gamma is None or beta is None or eps.size != 1:
            return None
        root = match.root.name
        scale = Constant(graph.unique_name(f"{root}.scale"), gamma.astype(x.dtype))
        bias = Constant(graph.unique_name(f"{root}.bias"), beta.astype(x.dtype))
        return match.replace_root("layer_norm", [x, scale, bias], axis=-1,
                                  eps=float(eps.data.reshape(-1)[0]))

    return rewrite


def _rule(rank: int) -> Rule:
    # Traced once per rank, because the traced reduce_mean names its axis as a number.
    example = (torch.randn((2,) * (rank - 1) + (8,)), torch.ones(8), torch.zeros(8),
               torch.tensor(1e-5))
    pattern = pattern_from_torch(decomposed_layer_norm, example,
                                 constants=("gamma", "beta", "eps"))
    return Rule(f"layer-norm-{rank}d", pattern, _fuse(rank))


class FuseLayerNorm(RewritePass):
    """(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * gamma + beta -> layer_norm(x)

    Normalization over the last axis, decomposed into nine nodes, becomes one layer_norm node,
    which backends run as one kernel. ONNX exporters before opset 17 write layer norm this way:
    PP-OCRv4 rec contains five of them. gamma, beta and eps must be constants, gamma and beta
    one number per channel of the last axis (or one for all), and x of rank 2, 3 or 4.

    Run it after ``fold-constants``, which turns exported constant subgraphs into the
    constants this pattern expects, and before ``dce``.

    Does not cover yet: the forms with ``mul(d, d)`` in place of ``pow(d, 2)``, with a
    reciprocal square root, or without gamma and beta.

    Example::

        before:
          mean: %m = reduce_mean(%x) {axes=[2], keepdims=True} -> float32[1,40,1]
          sub: %d = sub(%x, %m) -> float32[1,40,120]
          pow: %p = pow(%d, @two) -> float32[1,40,120]
          var: %v = reduce_mean(%p) {axes=[2], keepdims=True} -> float32[1,40,1]
          add: %a = add(%v, @eps) -> float32[1,40,1]
          sqrt: %s = sqrt(%a) -> float32[1,40,1]
          div: %n = div(%d, %s) -> float32[1,40,120]
          mul: %g = mul(%n, @gamma) -> float32[1,40,120]
          shift: %y = add(%g, @beta) -> float32[1,40,120]
        after:
          shift: %y = layer_norm(%x, @shift.scale, @shift.bias) {axis=-1, eps=1e-05}
    """

    name = "fuse-layer-norm"
    summary = "fuse decomposed layer norms (mean, sub, pow, sqrt, div, mul, add) into one op"

    @classmethod
    @functools.cache
    def get_rules(cls) -> tuple[Rule, ...]:
        # Tracing takes seconds (3.4 s for the three ranks on a 2-core machine), so it waits
        # until the pass first runs.
        return tuple(_rule(rank) for rank in (2, 3, 4))
