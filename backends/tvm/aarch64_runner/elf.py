"""Read the header and the symbol names of a 64-bit little-endian ELF file, in pure Python.

graphcomp uses it to check what a build produced without the machine it was built for: that
an ARM artifact's library is aarch64 code exporting TVM's entry points, and that a CUDA
cubin is GPU code holding every kernel. Only ELF64 little-endian files are read, which
covers x86-64, aarch64 and CUDA cubins.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# e_machine values from the ELF specification and NVIDIA's cubin format.
EM_X86_64 = 62
EM_AARCH64 = 183
EM_CUDA = 190

_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_SECTION = struct.Struct("<IIQQQQIIQQ")
_SYMBOL = struct.Struct("<IBBHQQ")
_SHT_SYMTAB = 2
_SHT_DYNSYM = 11
_SYMBOL_TYPES = {0: "notype", 1: "object", 2: "func", 3: "section", 4: "file", 6: "tls"}


@dataclass(frozen=True)
class ElfHeader:
    """The fields of an ELF header that tell what machine a file is for."""

    machine: int
    flags: int
    os_abi: int
    abi_version: int


@dataclass(frozen=True)
class ElfSymbol:
    name: str
    kind: str  # "func", "object", "notype", ...
    defined: bool  # False for a symbol the file imports


def read_header(data: bytes) -> ElfHeader:
    """Parse the ELF header at the start of ``data``; raises ValueError unless it is ELF64 LE."""
    if len(data) < _HEADER.size or data[:4] != _MAGIC:
        raise ValueError("not an ELF file")
    ident = data[:16]
    if ident[4] != _ELFCLASS64 or ident[5] != _ELFDATA2LSB:
        raise ValueError("not a 64-bit little-endian ELF file")
    fields = _HEADER.unpack_from(data)
    return ElfHeader(machine=fields[2], flags=fields[7], os_abi=ident[7], abi_version=ident[8])


def read_symbols(data: bytes, dynamic: bool = True) -> list[ElfSymbol]:
    """List the symbols of the dynamic symbol table (``.dynsym``), or of the full one
    (``.symtab``) when ``dynamic`` is False. Raises ValueError on a truncated file."""
    read_header(data)
    fields = _HEADER.unpack_from(data)
    section_offset, section_size, section_count = fields[6], fields[11], fields[12]
    if section_size != _SECTION.size or section_offset + section_count * section_size > len(data):
        raise ValueError("truncated or corrupt ELF section table")
    sections = [
        _SECTION.unpack_from(data, section_offset + i * section_size) for i in range(section_count)
    ]
    wanted = _SHT_DYNSYM if dynamic else _SHT_SYMTAB
    symbols = []
    for section in sections:
        kind, offset, size, link = section[1], section[4], section[5], section[6]
        if kind != wanted:
            continue
        strings = sections[link]
        string_table = data[strings[4]:strings[4] + strings[5]]
        for at in range(offset + _SYMBOL.size, offset + size, _SYMBOL.size):  # skip entry 0
            name_at, info, _, section_index, _, _ = _SYMBOL.unpack_from(data, at)
            name = string_table[name_at:string_table.index(b"\0", name_at)].decode()
            symbol_kind = _SYMBOL_TYPES.get(info & 0xF, str(info & 0xF))
            symbols.append(ElfSymbol(name, symbol_kind, defined=section_index != 0))
    return symbols
