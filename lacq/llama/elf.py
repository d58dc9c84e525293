"""Just enough ELF reading to see which symbols a shared library defines.

lacq uses it for one check: some C++ toolchains (a GCC built with a static
libstdc++, or devtoolset-style compilers that add libstdc++_nonshared.a)
copy parts of libstdc++ into every shared library they link. libggml and
libllama then each carry their own std::locale, and llama.cpp's tokenizer
(std::regex) crashes once those libraries are loaded into a Python process
that already holds the system libstdc++. The tools themselves run, so only
the in-process NIAH runner needs to know.
"""

from __future__ import annotations

import struct
from pathlib import Path

SHT_DYNSYM = 11
SHN_UNDEF = 0
# Members of std::locale live in libstdc++ itself; a library that defines them carries a copy.
PRIVATE_RUNTIME_PREFIX = "_ZNSt6locale"
RUNTIME_CHECKED = ("libggml-base.so", "libggml.so", "libllama.so")


def defined_dynamic_symbols(path: Path) -> set[str]:
    """Names of the symbols `path` defines in its dynamic symbol table.

    Empty for anything that is not a 64-bit little-endian ELF file (a macOS
    dylib, a truncated file): the check this serves is Linux-only.
    """
    data = Path(path).read_bytes()
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return set()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = []
    for i in range(shnum):
        base = shoff + i * shentsize
        if base + 64 > len(data):
            return set()
        _name, sh_type, _flags, _addr, offset, size, link, _info, _align, entsize = \
            struct.unpack_from("<IIQQQQIIQQ", data, base)
        sections.append((sh_type, offset, size, link, entsize))
    names: set[str] = set()
    for sh_type, offset, size, link, entsize in sections:
        if sh_type != SHT_DYNSYM or not entsize or link >= len(sections):
            continue
        _t, str_off, str_size, _l, _e = sections[link]
        strtab = data[str_off:str_off + str_size]
        for pos in range(offset, min(offset + size, len(data) - 23), entsize):
            st_name, _info, _other, st_shndx = struct.unpack_from("<IBBH", data, pos)
            if st_shndx == SHN_UNDEF or st_name == 0:
                continue
            end = strtab.find(b"\0", st_name)
            names.add(strtab[st_name:end].decode("ascii", "replace"))
    return names


def private_cxx_runtime(bin_dir: Path) -> Path | None:
    """The first of the build's core libraries that carries its own copy of libstdc++, if any."""
    for name in RUNTIME_CHECKED:
        lib = Path(bin_dir) / name
        if lib.exists() and any(s.startswith(PRIVATE_RUNTIME_PREFIX) for s in defined_dynamic_symbols(lib)):
            return lib
    return None


PRIVATE_RUNTIME_HINT = ("its C++ compiler copies libstdc++ into each shared library, and llama.cpp's tokenizer "
                        "crashes when such libraries are loaded into Python; rebuild with the system compiler "
                        "(for example CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ lacq build ...)")
