"""Two ways to answer a needle prompt, with the same answers on the same prompt text.

`BindingsRunner` runs in process through llama-cpp-python bound to the patched
libllama of the build; `CompletionRunner` runs llama-completion with the prompt
passed byte for byte (-bf). Both satisfy `Runner`.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lacq.errors import ToolError
from lacq.llama.tools import completion
from lacq.llama.tools.base import run_captured
from lacq.measure.niah.prompts import NiahError, NiahPrompt
from lacq.plan.kv.config import ENV_K, ENV_V, KvConfig

log = logging.getLogger(__name__)

BINDINGS_VERSION = "0.3.36"  # llama-cpp-python release whose vendor tree is lacq's pinned source


class Runner(Protocol):
    name: str

    def count_tokens(self, text: str) -> int: ...

    def generate(self, prompt: NiahPrompt, n_predict: int) -> "Answer": ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Answer:
    text: str
    n_prompt_tokens: int
    seconds: float


def _fa_on(kv: KvConfig) -> bool:
    # llama-cpp-python has no "auto"; the pinned tree's auto enables flash attention on
    # CPU, CUDA and Metal, so both runners resolve auto to on.
    return kv.flash_attn != "off"


class BindingsRunner:
    """llama-cpp-python, in process, bound to the build's libllama."""

    name = "bindings"

    def __init__(self, build, model: Path, kv: KvConfig, *, threads: int | None = None, ngl: int | None = None):
        self.llama_cpp = load_bindings(build.bin_dir)
        self.type_ids = ggml_type_ids(build.bin_dir)
        self.build, self.model, self.kv = build, Path(model), kv
        self.threads = threads or min(os.cpu_count() or 1, 8)
        self.ngl = ngl if ngl is not None else -1  # all layers, like the tools' default
        self._llm = None
        self._n_ctx = None
        self._vocab = None

    def _type(self, name: str) -> int:
        try:
            return self.type_ids[name]
        except KeyError:
            raise NiahError(f"the library at {self.build.bin_dir} has no ggml type {name!r}") from None

    def _context(self, n_ctx: int):
        if self._llm is not None and self._n_ctx == n_ctx:
            return self._llm
        self._close_context()
        # The per-layer KV patch reads its policy when the context is created.
        saved = {k: os.environ.pop(k, None) for k in (ENV_K, ENV_V)}
        os.environ.update(self.kv.env())
        try:
            self._llm = self.llama_cpp.Llama(
                str(self.model), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=self.threads,
                n_threads_batch=self.threads, n_gpu_layers=self.ngl, flash_attn=_fa_on(self.kv),
                type_k=self._type(self.kv.k), type_v=self._type(self.kv.v), verbose=False)
        except ValueError as exc:
            raise NiahError(f"llama-cpp-python could not load {self.model} with n_ctx={n_ctx} "
                            f"({self.kv.label()}): {exc}") from None
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None)
                if v is not None:
                    os.environ[k] = v
        self._n_ctx = n_ctx
        return self._llm

    def tokenizer(self):
        """A vocab-only model for counting tokens (no weights, no context)."""
        if self._vocab is None:
            from llama_cpp._internals import LlamaModel
            params = self.llama_cpp.llama_model_default_params()
            params.vocab_only = True
            try:
                self._vocab = LlamaModel(path_model=str(self.model), params=params, verbose=False)
            except ValueError:
                raise NiahError(f"llama-cpp-python could not load the vocabulary of {self.model}") from None
        return self._vocab

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer().tokenize(text.encode(), True, True))

    def generate(self, prompt: NiahPrompt, n_predict: int) -> Answer:
        llm = self._context(prompt.length)
        tokens = llm.tokenize(prompt.text.encode(), add_bos=True, special=True)
        t0 = time.monotonic()
        llm.reset()  # no prefix reuse: every prompt is evaluated from scratch, like llama-completion
        out = []
        for tok in llm.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if self.llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
                break
            out.append(tok)
            if len(out) >= n_predict:
                break
        text = llm.detokenize(out).decode("utf-8", "replace")
        return Answer(text, len(tokens), time.monotonic() - t0)

    def _close_context(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def close(self) -> None:
        self._close_context()
        if self._vocab is not None:
            self._vocab.close()
            self._vocab = None


def load_bindings(bin_dir: Path):
    """Import llama_cpp bound to `bin_dir`'s libllama, or explain why it cannot be."""
    import importlib.metadata
    import sys
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise NiahError("llama-cpp-python is not installed; install it without compiling with "
                        f'CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install llama-cpp-python=={BINDINGS_VERSION}'
                        ", or run with --runner completion") from None
    check_bindings_version(version)
    from lacq.llama.elf import PRIVATE_RUNTIME_HINT, private_cxx_runtime
    if (lib := private_cxx_runtime(bin_dir)) is not None:
        raise NiahError(f"the in-process runner cannot use the build in {bin_dir}: {lib.name} defines "
                        f"std::locale; {PRIVATE_RUNTIME_HINT}, or run with --runner completion")
    if "llama_cpp" not in sys.modules:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(bin_dir)
    try:
        import llama_cpp
    except (OSError, FileNotFoundError, AttributeError, RuntimeError) as exc:
        raise NiahError(f"llama-cpp-python {version} cannot bind the library in {bin_dir}: {exc}") from None
    check_loaded_library(getattr(llama_cpp.llama_cpp._lib, "_name", ""), bin_dir)
    return llama_cpp


def check_bindings_version(version: str) -> None:
    if version != BINDINGS_VERSION:
        raise NiahError(f"llama-cpp-python {version} does not match the pinned llama.cpp "
                        f"(needs {BINDINGS_VERSION}: its ctypes signatures mirror that tree's llama.h)")


def check_loaded_library(lib_path: str, bin_dir: Path) -> None:
    if not lib_path or Path(lib_path).resolve().parent != Path(bin_dir).resolve():
        raise NiahError(f"llama-cpp-python is bound to {lib_path or 'an unknown library'}, not the build's "
                        f"{bin_dir}; it was imported before lacq could point LLAMA_CPP_LIB_PATH at the build "
                        "(start a new process)")


def ggml_type_ids(bin_dir: Path) -> dict[str, int]:
    """Type name -> ggml_type id, asked of the build's own libggml (patch-added types included).

    ggml_type_name() does not bounds-check, so GGML_TYPE_COUNT comes from the
    ggml.h of the tree the build was made from (<tree>/build-*/bin).
    """
    import ctypes
    header = Path(bin_dir).resolve().parent.parent / "ggml" / "include" / "ggml.h"
    m = re.search(r"GGML_TYPE_COUNT\s*=\s*(\d+)", header.read_text()) if header.exists() else None
    if not m:
        raise NiahError(f"cannot find GGML_TYPE_COUNT in {header}; is {bin_dir} a lacq build?")
    lib = ctypes.CDLL(str(Path(bin_dir) / "libggml-base.so"))
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    out = {}
    for i in range(int(m.group(1))):
        name = lib.ggml_type_name(i)
        if name and lib.ggml_blck_size(i) > 0:  # removed types keep a slot with block size 0
            out.setdefault(name.decode(), i)
    return out


# ---------------------------------------------------------------- llama-completion
class CompletionRunner:
    """llama-completion in a subprocess per prompt (for builds used without Python bindings)."""

    name = "completion"

    def __init__(self, build, model: Path, kv: KvConfig, *, threads: int | None = None, ngl: int | None = None):
        self.binary = build.tool("llama-completion")
        self.model, self.kv = Path(model), kv
        self.threads = threads or min(os.cpu_count() or 1, 8)
        self.ngl = ngl

    def _run(self, text: str, n_ctx: int, n_predict: int) -> tuple[str, str, int]:
        with tempfile.TemporaryDirectory() as tmp:
            pf = Path(tmp) / "prompt.txt"
            pf.write_bytes(text.encode())
            args = completion.argv(self.binary, self.model, pf, n_ctx=n_ctx, n_predict=n_predict,
                                   threads=self.threads, ngl=self.ngl,
                                   kv_args=["-ctk", self.kv.k, "-ctv", self.kv.v,
                                            "-fa", "on" if _fa_on(self.kv) else "off"])
            env = {k: v for k, v in os.environ.items() if k not in (ENV_K, ENV_V)}
            env.update(self.kv.env())
            return run_captured(args, env=env)

    def count_tokens(self, text: str) -> int:
        """Tokens llama-completion makes of `text`: it says so when the prompt is longer than n_ctx - 4."""
        out, err, rc = self._run(text, 8, 1)
        if (n := completion.prompt_too_long(err)) is not None:
            return n
        _, n = completion.parse(out, err)
        if n is None:
            raise ToolError("llama-completion did not report the prompt's token count", log_tail=err[-2000:])
        return n

    def generate(self, prompt: NiahPrompt, n_predict: int) -> Answer:
        t0 = time.monotonic()
        out, err, rc = self._run(prompt.text, prompt.length, n_predict)
        if rc != 0:
            tail = "\n".join(l for l in err.splitlines() if l.strip())[-2000:]
            raise ToolError(f"llama-completion exited with status {rc}", log_tail=tail)
        text, n = completion.parse(out, err)
        return Answer(text, n or 0, time.monotonic() - t0)

    def close(self) -> None:
        pass


