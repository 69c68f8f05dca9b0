"""Put compiled CUDA kernels, instead of CUDA C source, into an exported library.

TVM 0.27 keeps a CUDA kernel module as CUDA C source (format "cuda") and compiles it when the
library is loaded, through a Python callback that needs NVRTC there. An artifact should
carry machine code for the GPU it was built for, so export:

1. compiles each CUDA module's source with nvcc into a fatbin holding SASS for the target's
   architecture and PTX of the same compute capability (for newer GPUs),
2. rewrites that module's entry in the serialized module tree from (format "cuda", kernel
   table, source) to (format "fatbin", kernel table, fatbin), which TVM's CUDA runtime loads
   with cuModuleLoadData,
3. writes the tree as the C array that ``export_library`` links into the library.

NOTE: the entry layout is TVM 0.27's (length-prefixed format string, kernel table, payload);
``_patch_entry`` checks it and raises BackendError on anything else. Loading the patched
library was not run on a GPU here (the build machine has nvcc but no GPU).
"""

from __future__ import annotations

import logging
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from graphcomp.errors import BackendError

from .aarch64_runner.elf import EM_CUDA, read_header, read_symbols

if TYPE_CHECKING:
    import tvm

logger = logging.getLogger(__name__)

FATBIN_MAGIC = 0xBA55ED50


def _packed_string(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def cuda_modules(module) -> list:
    """Return the CUDA kernel modules in a runtime module's import tree."""
    found = []
    stack = [module]
    while stack:
        current = stack.pop()
        if current.kind == "cuda":
            found.append(current)
        stack.extend(current.imports)
    return found


def compile_fatbin(source: str, target: "tvm.target.Target") -> bytes:
    """Compile CUDA C source with nvcc into a fatbin with SASS and PTX for the target's arch.

    Uses TVM's nvcc driver, so the flags (``--use_fast_math`` among them) are the ones TVM
    uses when it compiles kernels itself.
    """
    from tvm.support import nvcc

    arch = str(target.attrs["arch"])
    compute = "compute_" + arch.removeprefix("sm_")
    gencode = [
        "-gencode", f"arch={compute},code={arch}",
        "-gencode", f"arch={compute},code={compute}",
    ]
    try:
        with target:
            return bytes(nvcc.compile_cuda(source, "fatbin", gencode, compiler="nvcc"))
    except (RuntimeError, OSError, ValueError) as exc:
        raise BackendError(
            f"nvcc failed to compile the CUDA kernels for {arch}: {_nvcc_message(exc)}. "
            "Check that nvcc from CUDA 11 or later is on PATH and supports this architecture"
            f"{_supported_architectures()}."
        ) from exc


def _nvcc_message(exc: Exception) -> str:
    # TVM's nvcc driver raises the whole CUDA source, then "Compilation error:" and nvcc's
    # output; only that output describes the failure.
    text = str(exc)
    marker = "Compilation error:"
    if marker in text:
        text = text[text.rindex(marker) + len(marker):]
    return text.strip()[-2000:]


def _supported_architectures() -> str:
    try:
        listing = subprocess.run(
            ["nvcc", "--list-gpu-arch"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    arches = [line.replace("compute_", "sm_") for line in listing.split()]
    return f" (this nvcc builds for {', '.join(arches)})" if arches else ""


def fpack_imports_with_fatbins(target: "tvm.target.Target") -> Callable[..., str]:
    """Return an ``fpack_imports`` function for ``export_library`` that stores each CUDA
    module as a fatbin compiled for ``target``."""

    def pack(module, is_system_lib: bool, symbol_prefix: str, workspace_dir: str) -> str:
        import tvm_ffi

        blob = bytes(tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(module).numpy())
        for cuda in cuda_modules(module):
            source = cuda.inspect_source()
            blob = _patch_entry(blob, source.encode(), compile_fatbin(source, target))
            logger.info("compiled a CUDA module for %s with nvcc", target.attrs["arch"])
        c_source = tvm_ffi.get_global_func("runtime.ModulePackImportsToC")(
            module, is_system_lib, symbol_prefix
        )
        path = Path(workspace_dir) / f"{symbol_prefix}devc.c"
        path.write_text(_replace_c_array(c_source, blob))
        return str(path)

    return pack


def _patch_entry(blob: bytes, source: bytes, fatbin: bytes) -> bytes:
    """Replace the serialized CUDA module whose payload is ``source`` with ``fatbin``.

    Entry layout: type key "cuda", u64 payload length, then the payload: format string,
    kernel table, data string. Strings are a u64 length followed by the bytes.
    """
    header = _packed_string(b"cuda")
    tail = _packed_string(source)
    start = 0
    while (start := blob.find(header, start)) >= 0:
        length_at = start + len(header)
        if length_at + 8 > len(blob):
            break
        (payload_length,) = struct.unpack_from("<Q", blob, length_at)
        payload_at = length_at + 8
        payload = blob[payload_at:payload_at + payload_length]
        if payload.startswith(header) and payload.endswith(tail):
            table = payload[len(header):len(payload) - len(tail)]
            new_payload = _packed_string(b"fatbin") + table + _packed_string(fatbin)
            patched = (
                blob[:length_at]
                + struct.pack("<Q", len(new_payload))
                + new_payload
                + blob[payload_at + payload_length:]
            )
            # The first u64 is the byte count of everything after it.
            return struct.pack("<Q", len(patched) - 8) + patched[8:]
        start += 1
    raise BackendError(
        "cannot find the CUDA kernel module in the serialized library; this TVM version "
        "stores it in a layout graphcomp does not know (checked with TVM 0.27)"
    )


def _replace_c_array(c_source: str, blob: bytes) -> str:
    pattern = re.compile(r"(const unsigned char \w+)\[\d+\] = \{[^}]*\};")
    if len(pattern.findall(c_source)) != 1:
        raise BackendError("unexpected C source from TVM's ModulePackImportsToC; cannot patch")
    rows = [
        ",".join(f"0x{byte:02x}" for byte in blob[i:i + 32]) for i in range(0, len(blob), 32)
    ]
    array = "\\1[%d] = {\n  %s\n};" % (len(blob), ",\n  ".join(rows))
    return pattern.sub(array, c_source)


@dataclass(frozen=True)
class FatbinEntry:
    """One compiled form of the kernels in a fatbin."""

    kind: str  # "sass" for machine code, "ptx" for PTX
    arch: int  # the sm version: 80 means sm_80
    payload: bytes  # a cubin (ELF) for "sass"; PTX text, which nvcc may compress, for "ptx"


def fatbin_entries(data: bytes) -> list[FatbinEntry]:
    """List the entries of every fatbin found in ``data`` (a library).

    A fatbin starts with u32 magic, u16 version, u16 header size and u64 size. Each entry
    then starts with u16 kind, u16 version, u32 header size and u64 padded payload size,
    and has the architecture as a u32 at byte 28; its payload follows its header.
    """
    found = []
    magic = struct.pack("<I", FATBIN_MAGIC)
    start = 0
    while (start := data.find(magic, start)) >= 0:
        if start + 16 > len(data):
            break
        _, _, header_size, total = struct.unpack_from("<IHHQ", data, start)
        entry = start + header_size
        end = entry + total
        while entry + 32 <= min(end, len(data)):
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            (arch,) = struct.unpack_from("<I", data, entry + 28)
            body = data[entry + entry_header:entry + entry_header + payload]
            found.append(FatbinEntry({1: "ptx", 2: "sass"}.get(kind, str(kind)), arch, body))
            if entry_header == 0:
                break
            entry += entry_header + payload
        start += 4
    return found


def fatbin_architectures(data: bytes) -> list[tuple[str, int]]:
    """List (kind, sm version) of every fatbin entry in ``data``: ("sass", 90) is sm_90
    machine code, ("ptx", 90) PTX for compute_90."""
    return [(entry.kind, entry.arch) for entry in fatbin_entries(data)]


def cubin_kernels(cubin: bytes) -> list[str]:
    """Return the names of the kernels a cubin defines; raises ValueError unless it is
    an uncompressed CUDA ELF file."""
    header = read_header(cubin)
    if header.machine != EM_CUDA:
        raise ValueError(f"ELF machine is {header.machine}, not {EM_CUDA} (CUDA)")
    symbols = read_symbols(cubin, dynamic=False)
    return sorted(symbol.name for symbol in symbols if symbol.kind == "func" and symbol.defined)
