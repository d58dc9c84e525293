"""The private-libstdc++ check, on libraries compiled here by the real g++.

A toolchain that copies libstdc++ into each shared library made lacq's
in-process NIAH runner crash (SIGSEGV in std::regex) on the GPU host; g++
with -static-libstdc++ makes a library of the same kind.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from lacq.llama.elf import defined_dynamic_symbols, private_cxx_runtime

SOURCE = """#include <regex>
#include <string>
extern "C" int lacq_probe(const char * s) { return std::regex_search(std::string(s), std::regex("[a-z]+")); }
"""

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    d = tmp_path_factory.mktemp("elf")
    (d / "probe.cpp").write_text(SOURCE)
    out = {}
    for name, extra in (("plain", []), ("private", ["-static-libstdc++"])):
        lib = d / f"lib{name}.so"
        subprocess.run(["g++", "-shared", "-fPIC", "-O0", *extra, str(d / "probe.cpp"), "-o", str(lib)],
                       check=True, capture_output=True)
        out[name] = lib
    return out


@needs_gxx
def test_defined_symbols_tell_a_private_libstdcxx_apart(libs):
    plain, private = defined_dynamic_symbols(libs["plain"]), defined_dynamic_symbols(libs["private"])
    assert "lacq_probe" in plain and "lacq_probe" in private
    assert not any(s.startswith("_ZNSt6locale") for s in plain)  # referenced, not defined
    assert "_ZNSt6locale7classicEv" in private


@needs_gxx
def test_private_runtime_found_in_a_bin_dir(libs, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(libs["plain"], bin_dir / "libllama.so")
    assert private_cxx_runtime(bin_dir) is None
    shutil.copy(libs["private"], bin_dir / "libggml-base.so")
    assert private_cxx_runtime(bin_dir) == bin_dir / "libggml-base.so"


def test_not_elf_or_truncated_reads_as_no_symbols(tmp_path):
    (tmp_path / "text.so").write_text("not a library")
    (tmp_path / "cut.so").write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 57 + b"\xff" * 16)
    assert defined_dynamic_symbols(tmp_path / "text.so") == set()
    assert defined_dynamic_symbols(tmp_path / "cut.so") == set()
    assert private_cxx_runtime(tmp_path / "missing") is None


@needs_gxx
def test_bindings_refuse_such_a_build_with_a_clear_error(libs, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(libs["private"], bin_dir / "libllama.so")
    code = ("from lacq.measure.niah import runners as niah\n"
            "try:\n    niah.load_bindings(__import__('pathlib').Path(%r))\n"
            "except niah.NiahError as e:\n    print('NIAHERROR', e)\n") % str(bin_dir)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if "llama-cpp-python is not installed" in out.stdout:
        pytest.skip("llama-cpp-python is not installed")
    assert "NIAHERROR" in out.stdout and "defines std::locale" in out.stdout, out.stdout + out.stderr
    assert "--runner completion" in out.stdout and "CXX=" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
