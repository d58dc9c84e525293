"""Needle-in-a-haystack probes: prompts cut by real token counts, two runners.

A trial hides one sentence with a random 4-digit passcode in WikiText-2 text
(or any haystack file) at a depth (0 = start of the haystack, 100 = right
before the question), wraps it in the model's chat template, pre-fills the
assistant's answer with "The secret passcode is" and decodes greedily. The
trial passes when the first number of the answer is the passcode.

Prompts depend only on (model tokenizer, haystack, seed, length, depth, trial),
so every KV configuration sees exactly the same inputs. The whole prompt plus
the answer fits the context length: `length` is the n_ctx of the run.

Two runners give the same answers on the same prompt text: `BindingsRunner`
(in process, llama-cpp-python bound to the patched libllama of the build) and
`CompletionRunner` (llama-completion, the prompt passed byte for byte with -bf).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from lacq.errors import LacqError, ToolError
from lacq.plan.kv.config import ENV_K, ENV_V, KvConfig
from lacq.llama.tools import completion

log = logging.getLogger(__name__)

NIAH_VERSION = 1
BINDINGS_VERSION = "0.3.36"  # llama-cpp-python release whose vendor tree is lacq's pinned source
INSTRUCTION = "Read the text below. A secret passcode is hidden in it."
NEEDLE = "The secret passcode is {key}. Remember it: {key} is the secret passcode."
QUESTION = "What is the secret passcode hidden in the text above? Answer with the number only."
ANSWER_PREFIX = "The secret passcode is"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEMPLATE_NAMES = ("auto", "none", "chatml")
MIN_HAYSTACK_TOKENS = 64
SAFETY_TOKENS = 4  # llama-completion refuses prompts longer than n_ctx - 4

TokenCounter = Callable[[str], int]


class NiahError(LacqError):
    """A needle probe cannot run as asked (context, template, haystack, bindings)."""


# ---------------------------------------------------------------- chat template
@dataclass(frozen=True)
class ChatTemplate:
    name: str  # "model", "chatml", "none", or a file path
    source: str | None  # jinja text; None = plain prompt without chat markup
    bos_token: str = ""
    eos_token: str = ""

    def render(self, user_text: str) -> str:
        if self.source is None:
            return f"{user_text}\n\n{ANSWER_PREFIX}"
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            text = env.from_string(self.source).render(
                messages=[{"role": "user", "content": user_text}], add_generation_prompt=True,
                bos_token=self.bos_token, eos_token=self.eos_token, raise_exception=raise_exception)
        except TemplateError as exc:
            raise NiahError(f"the {self.name} chat template does not render ({exc}); "
                            "pass --chat-template chatml, none or a .jinja file") from None
        return text + ANSWER_PREFIX


def model_chat_metadata(model: Path) -> tuple[str | None, str, str]:
    """(chat template, bos token text, eos token text) from the GGUF's tokenizer metadata."""
    import gguf
    reader = gguf.GGUFReader(model)

    def scalar(name):
        f = reader.fields.get(name)
        return f.contents() if f is not None else None

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    def token_text(key):
        idx = scalar(key)
        if tokens is None or idx is None or not 0 <= int(idx) < len(tokens.data):
            return ""
        return bytes(tokens.parts[tokens.data[int(idx)]]).decode("utf-8", "replace")

    return scalar("tokenizer.chat_template"), token_text("tokenizer.ggml.bos_token_id"), \
        token_text("tokenizer.ggml.eos_token_id")


def check_tokenizer(model: Path) -> None:
    """A needle probe tokenizes text: refuse a GGUF that carries no tokenizer."""
    import gguf
    fields = gguf.GGUFReader(model).fields
    if "tokenizer.ggml.model" not in fields or "tokenizer.ggml.tokens" not in fields:
        raise NiahError(f"{Path(model).name} has no tokenizer (no tokenizer.ggml.* metadata); "
                        "needle probes need one")


def resolve_template(spec: str, model: Path) -> ChatTemplate:
    """auto (the model's own, plain if it has none), none, chatml, or a .jinja file."""
    source, bos, eos = model_chat_metadata(model)
    if spec == "auto":
        if not source:
            log.warning("%s has no chat template; using a plain prompt", model.name)
            return ChatTemplate("none", None)
        template = ChatTemplate("model", source, bos, eos)
    elif spec == "none":
        return ChatTemplate("none", None)
    elif spec == "chatml":
        template = ChatTemplate("chatml", CHATML, bos, eos)
    elif Path(spec).is_file():
        template = ChatTemplate(str(spec), Path(spec).read_text(), bos, eos)
    else:
        raise NiahError(f"unknown chat template {spec!r}; use one of {', '.join(TEMPLATE_NAMES)} or a .jinja file")
    template.render("probe")  # fail now, not after the model is loaded
    return template


# ---------------------------------------------------------------- prompts
@dataclass(frozen=True)
class NiahPrompt:
    length: int  # the context length (n_ctx) this prompt is built for
    depth: int  # percent of the haystack before the needle
    trial: int
    key: str
    text: str
    n_tokens: int


def trial_rng(seed: int, length: int, trial: int) -> random.Random:
    return random.Random(f"lacq-niah:{seed}:{length}:{trial}")


def user_message(haystack: str, depth: int, key: str) -> str:
    """The haystack with the needle at `depth` percent, snapped back to a sentence end."""
    pos = round(len(haystack) * depth / 100)
    if 0 < pos < len(haystack):
        window = haystack[max(0, pos - 400):pos]
        cut = max(window.rfind(". "), window.rfind("\n"))
        pos = pos - len(window) + cut + 1 if cut >= 0 else haystack.rfind(" ", 0, pos) + 1
    needle = NEEDLE.format(key=key)
    before, after = haystack[:pos].rstrip(" "), haystack[pos:].lstrip(" ")
    body = " ".join(p for p in (before, needle, after) if p)
    return f"{INSTRUCTION}\n\n{body}\n\n{QUESTION}"


def _word_cuts(text: str) -> list[int]:
    return [m.start() for m in re.finditer(r"\s", text)] + [len(text)]


class PromptBuilder:
    """Cuts haystacks so that the rendered prompt fills `length - n_predict - 4` tokens."""

    def __init__(self, corpus_text: str, template: ChatTemplate, count: TokenCounter, *, seed: int = 0,
                 n_predict: int = 16):
        self.corpus = corpus_text
        self.template = template
        self.count = count
        self.seed = seed
        self.n_predict = n_predict
        self._haystacks: dict[tuple[int, int], tuple[str, str]] = {}

    def budget(self, length: int) -> int:
        return length - self.n_predict - SAFETY_TOKENS

    def overhead(self) -> int:
        """Tokens of everything but the haystack: template, instruction, needle, question, answer prefix."""
        return self.count(self.template.render(user_message("", 0, "0000")))

    def check_fits(self, length: int) -> None:
        need = self.overhead() + MIN_HAYSTACK_TOKENS
        if need > self.budget(length):
            raise NiahError(f"a context of {length} tokens cannot hold the needle: template, needle and question "
                            f"take {need - MIN_HAYSTACK_TOKENS} tokens, the answer {self.n_predict}, leaving "
                            f"{self.budget(length) - need + MIN_HAYSTACK_TOKENS} for the haystack "
                            f"(at least {MIN_HAYSTACK_TOKENS} needed)")

    def _haystack(self, length: int, trial: int) -> tuple[str, str]:
        """(haystack text, key) for this length and trial; the same for every depth."""
        if (length, trial) in self._haystacks:
            return self._haystacks[(length, trial)]
        rng = trial_rng(self.seed, length, trial)
        budget = self.budget(length)
        # Characters per token from a sample, with room to spare; the search below is exact.
        sample = self.corpus[:20000]
        per_token = len(sample) / max(self.count(sample), 1)
        need_chars = int(budget * per_token * 1.5) + 2000
        if need_chars > len(self.corpus):
            raise NiahError(f"the haystack text has {len(self.corpus):,} characters; a context of {length} tokens "
                            f"needs about {need_chars:,}: give a longer --haystack")
        start = rng.randrange(0, len(self.corpus) - need_chars + 1)
        nl = self.corpus.find("\n", start, start + 2000)
        start = nl + 1 if nl >= 0 else start
        text = self.corpus[start:start + need_chars]
        key = f"{rng.randint(1000, 9999)}"
        while key in text:
            key = f"{rng.randint(1000, 9999)}"
        cuts = _word_cuts(text)
        fits = lambda i: self.count(self.template.render(user_message(text[:cuts[i]].rstrip(), 50, key))) <= budget
        if not fits(0):
            raise NiahError(f"a context of {length} tokens cannot hold the needle prompt")
        if fits(len(cuts) - 1):
            raise NiahError(f"the haystack slice ran out before {length} tokens; give a longer --haystack")
        lo, hi = 0, len(cuts) - 1  # fits(lo), not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        self._haystacks[(length, trial)] = (text[:cuts[lo]].rstrip(), key)
        return self._haystacks[(length, trial)]

    def prompt(self, length: int, depth: int, trial: int) -> NiahPrompt:
        haystack, key = self._haystack(length, trial)
        budget = self.budget(length)
        cuts = _word_cuts(haystack)
        i = len(cuts) - 1
        while True:  # the needle's position can change the count by a token or two
            text = self.template.render(user_message(haystack[:cuts[i]].rstrip(), depth, key))
            n = self.count(text)
            if n <= budget:
                return NiahPrompt(length, depth, trial, key, text, n)
            i -= max(1, (n - budget) // 2)
            if i < 0:
                raise NiahError(f"cannot fit the needle prompt into {length} tokens")


# ---------------------------------------------------------------- scoring
_NUMBER = re.compile(r"\d+")


def first_number(answer: str) -> str | None:
    m = _NUMBER.search(answer)
    return m.group(0) if m else None


def score(key: str, answer: str) -> bool:
    """Exact retrieval: the first number the model writes is the passcode."""
    return first_number(answer) == key


# ---------------------------------------------------------------- runners
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
                                   threads=self.threads, ngl=self.ngl, kv=self.kv, flash_attn=_fa_on(self.kv))
            env = {k: v for k, v in os.environ.items() if k not in (ENV_K, ENV_V)}
            env.update(self.kv.env())
            proc = subprocess.run(args, capture_output=True, env=env, stdin=subprocess.DEVNULL)
        return proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"), proc.returncode

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


# ---------------------------------------------------------------- the grid
@dataclass(frozen=True)
class NiahTrial:
    length: int
    depth: int
    trial: int
    key: str
    answer: str
    passed: bool
    n_prompt_tokens: int
    seconds: float


def check_lengths(lengths: list[int], n_ctx_train: int | None) -> None:
    for n in lengths:
        if n_ctx_train and n > n_ctx_train:
            raise NiahError(f"context {n} is longer than the model supports ({n_ctx_train} tokens of training "
                            "context); drop it from --ctx")
        if n < 128:
            raise NiahError(f"context {n} is too short for a needle probe (at least 128 tokens)")


def check_depths(depths: list[int]) -> None:
    for d in depths:
        if not 0 <= d <= 100:
            raise NiahError(f"depth {d} is not a percentage between 0 and 100")


class Journal:
    """The probes of one grid run so far, one JSON line each, so an interrupted grid resumes.

    The file's name is a hash of everything that decides the answers (model, build,
    KV configuration, runner, haystack, template, seed, n_predict): a probe read back
    is the one the same command would produce again.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.done: dict[tuple[int, int, int], NiahTrial] = {}
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        for n, line in enumerate(lines):
            try:
                t = NiahTrial(**json.loads(line))
            except (ValueError, TypeError):  # a line cut short by a kill: keep what came before it
                self.path.write_text("".join(f"{good}\n" for good in lines[:n]))
                break
            self.done[(t.length, t.depth, t.trial)] = t

    def get(self, length: int, depth: int, trial: int) -> NiahTrial | None:
        return self.done.get((length, depth, trial))

    def add(self, t: NiahTrial) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(asdict(t)) + "\n")
        self.done[(t.length, t.depth, t.trial)] = t

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def run_grid(runner, builder: PromptBuilder, lengths: list[int], depths: list[int], trials: int,
             progress: Callable[[float, str], None] | None = None,
             journal: Journal | None = None) -> list[NiahTrial]:
    out = []
    total = len(lengths) * len(depths) * trials
    for length in lengths:
        for trial in range(trials):
            for depth in depths:
                t = journal.get(length, depth, trial) if journal else None
                if t is None:
                    p = builder.prompt(length, depth, trial)
                    a = runner.generate(p, builder.n_predict)
                    if a.n_prompt_tokens and a.n_prompt_tokens != p.n_tokens:
                        raise NiahError(f"the runner tokenized the prompt to {a.n_prompt_tokens} tokens, the "
                                        f"builder counted {p.n_tokens}: tokenizers disagree")
                    t = NiahTrial(length, depth, trial, p.key, a.text, score(p.key, a.text), p.n_tokens,
                                  round(a.seconds, 3))
                    if journal:
                        journal.add(t)
                out.append(t)
                if progress:
                    progress(len(out) / total, f"ctx {length} depth {depth}% trial {trial + 1}")
    return out


def pass_rates(trials: list[NiahTrial]) -> dict[tuple[int, int], tuple[int, int]]:
    """(length, depth) -> (passed, run)."""
    grid: dict[tuple[int, int], tuple[int, int]] = {}
    for t in trials:
        p, n = grid.get((t.length, t.depth), (0, 0))
        grid[(t.length, t.depth)] = (p + int(t.passed), n + 1)
    return grid
