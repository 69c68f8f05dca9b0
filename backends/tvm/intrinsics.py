"""Tensor intrinsics that MetaSchedule uses on graphcomp's targets, fixed where TVM's own no
longer compile.

``dot_16x4_vnni`` (vpdpbusd, x86 AVX-512 VNNI) is in MetaSchedule's schedule rules for every
LLVM target with VNNI. TVM 0.27 calls ``llvm.x86.avx512.vpdpbusd.512`` with three <16 x i32>
operands, the signature before LLVM 22. LLVM 22 (the one TVM 0.27's wheel links) declares the
two byte operands as <64 x i8>, so every tensorized candidate fails LLVM's verifier ("Call
parameter type does not match function signature") and tuning measures none of them.
``register_intrinsics`` replaces the implementation with one that passes the bytes as <64 x i8>
when TVM's LLVM is version 22 or newer; its description, and so what it matches, is TVM's.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tvm

logger = logging.getLogger(__name__)

VNNI_INTRINSIC = "dot_16x4_vnni"
_fixed = False


def has_avx512_vnni(target: "tvm.target.Target") -> bool:
    """Return whether ``target`` is an LLVM CPU with AVX-512 VNNI, whose MetaSchedule rules
    tensorize int8 sums with ``dot_16x4_vnni`` (in any layout that matches it)."""
    import tvm

    if target.kind.name != "llvm":
        return False
    return bool(tvm.get_global_func("target.target_has_feature")("avx512vnni", target))


def register_intrinsics(target: "tvm.target.Target") -> None:
    """Register the tensor intrinsics that MetaSchedule may use for ``target`` (those of its
    CPU family only, see tuning_workers), with ``dot_16x4_vnni`` fixed for LLVM 22."""
    global _fixed
    from tvm.target import codegen

    from .targets import export_json
    from .tuning_workers import register_tensor_intrinsics

    register_tensor_intrinsics(export_json(target))
    if _fixed or not has_avx512_vnni(target) or codegen.llvm_version_major() < 22:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin import x86

    TensorIntrin.register(VNNI_INTRINSIC, x86.dot_product_16x4_u8i8i32_desc,
                          _vnni_byte_operands(), override=True)
    logger.debug("registered %s with <64 x i8> operands for LLVM 22", VNNI_INTRINSIC)
    _fixed = True


def _vnni_byte_operands():
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def implementation(
        inputs: T.Buffer((4,), "uint8", offset_factor=1),
        weights: T.Buffer((16, 4), "int8", offset_factor=1),
        sums: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(sums[0:16], inputs[0:4], weights[0:16, 0:4])
            T.writes(sums[0:16])
            # The 4 input bytes, repeated in each of the 16 lanes.
            word = T.reinterpret(inputs.vload([0], "uint8x4"), dtype="int32")
            repeated = T.reinterpret(T.broadcast(word, 16), dtype="int8x64")
            sums[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                sums.vload([0], dtype="int32x16"),
                repeated,
                weights.vload([0, 0], dtype="int8x64"),
                dtype="int32x16",
            )

    return implementation
