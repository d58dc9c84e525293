"""Needle-in-a-haystack prompts: a passcode hidden at a depth of real text, cut to real token counts.

A trial hides one sentence with a random 4-digit passcode in WikiText-2 text
(or any haystack file) at a depth (0 = start of the haystack, 100 = right
before the question), wraps it in the model's chat template, pre-fills the
assistant's answer with "The secret passcode is" and decodes greedily. The
trial passes when the first number of the answer is the passcode.

Prompts depend only on (model tokenizer, haystack, seed, length, depth, trial),
so every KV configuration sees exactly the same inputs. The whole prompt plus
the answer fits the context length: `length` is the n_ctx of the run.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lacq.errors import LacqError
from lacq.model.tokenizer import chat_metadata, has_tokenizer

log = logging.getLogger(__name__)

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


def check_tokenizer(model: Path) -> None:
    """A needle probe tokenizes text: refuse a GGUF that carries no tokenizer."""
    if not has_tokenizer(model):
        raise NiahError(f"{Path(model).name} has no tokenizer (no tokenizer.ggml.* metadata); "
                        "needle probes need one")


def resolve_template(spec: str, model: Path) -> ChatTemplate:
    """auto (the model's own, plain if it has none), none, chatml, or a .jinja file."""
    source, bos, eos = chat_metadata(model)
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


