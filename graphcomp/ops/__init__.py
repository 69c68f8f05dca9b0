"""The op registry. Importing this package registers every built-in op."""

from graphcomp.ops import elementwise, nn, quantized, tensor  # noqa: F401  (registers ops)
from graphcomp.ops.elementwise import ACTIVATIONS, TORCH_DTYPES
from graphcomp.ops.registry import OpDef, get_op, register_op, registered_ops, unregister_op

__all__ = [
    "ACTIVATIONS", "TORCH_DTYPES", "OpDef", "get_op", "register_op", "registered_ops",
    "unregister_op",
]
