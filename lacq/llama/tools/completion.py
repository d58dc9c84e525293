"""llama-completion: argv builder and parser for one greedy completion of a prompt file.

lacq's NIAH probes use it where llama-cpp-python is not installed (or not
wanted). The prompt goes in byte for byte with -bf; --verbose-prompt makes the
tool log how many tokens the prompt became, and a prompt longer than n_ctx - 4
is refused with its token count, which is how the runner counts tokens.
"""

from __future__ import annotations

import re
from pathlib import Path

from lacq.llama.tools.base import thread_gpu_args

END_OF_TEXT = " [end of text]\n"
TOO_LONG = re.compile(r"prompt is too long \((\d+) tokens, max (\d+)\)")
N_PROMPT = re.compile(r"number of tokens in prompt = (\d+)")


def argv(binary: Path | str, model: Path | str, prompt_file: Path | str, *, n_ctx: int, n_predict: int,
         threads: int | None, ngl: int | None, kv_args: list[str]) -> list[str]:
    """Greedy decoding (temperature 0, top-k 1, no repeat penalty), no chat mode, no warm-up."""
    return [str(binary), "-m", str(model), "-bf", str(prompt_file), "-c", str(n_ctx), "-n", str(n_predict),
            "-no-cnv", "--temp", "0", "--top-k", "1", "--repeat-penalty", "1.0", "-b", "512", "-ub", "512",
            "--no-display-prompt", "--verbose-prompt", "--no-warmup", *kv_args,
            *thread_gpu_args(threads, ngl)]


def parse(stdout: str, stderr: str) -> tuple[str, int | None]:
    """(generated text, prompt tokens) from llama-completion's stdout and log."""
    # stdout: the generated pieces, " [end of text]\n" after an end-of-generation token, "\n\n" at exit.
    text = stdout[:-2] if stdout.endswith("\n\n") else stdout
    text = text[:-len(END_OF_TEXT)] if text.endswith(END_OF_TEXT) else text
    m = N_PROMPT.search(stderr)
    return text, int(m.group(1)) if m else None


def prompt_too_long(stderr: str) -> int | None:
    """The prompt's token count where the tool refused it as longer than the context."""
    m = TOO_LONG.search(stderr)
    return int(m.group(1)) if m else None
