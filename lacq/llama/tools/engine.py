"""The evaluation engine (llama-perplexity --engine-variants, lacq's last patch): argv, a running engine, parser.

One process loads the model and each candidate file once, then measures a stream of variants against the
base logits file: a variant points some of the model's tensors at a candidate's (weights) and/or re-creates
the context with other KV options (`-ctk/-ctv/-fa` and the per-layer `LLAMA_KV_TYPES_K/V`). Each variant
answers with one JSON line, `{"engine": "variant", "id", "ok", "seconds", "result" | "error"}`, whose
result holds the statistics `--kl-divergence` prints (same names as tools/kld.py's `KldResult`). Bad
candidates or logits stop the engine before the first variant with one `engine: ...` error line.
Where the model's layers are on a GPU the engine computes each token's KLD there (`Ready.kld_on` names the
device; LLAMA_ENGINE_KLD=host|device in its environment overrides), else on the host as llama-perplexity does.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from lacq.errors import ToolError
from lacq.llama.tools.base import _tool_preexec, stop_group, strip_prefix, tail, thread_gpu_args
from lacq.llama.tools.kld import KldChunk, KldResult

log = logging.getLogger(__name__)
MARK = '"engine":'  # the key every engine line has (nlohmann's JSON sorts keys, so not always first)


class EngineCrashed(ToolError):
    """The engine process ended while a variant was in flight."""


@dataclass(frozen=True)
class Ready:
    model_bytes: int
    candidates: dict[str, int]  # name -> bytes llama.cpp holds for that candidate model
    kld_on: str = "host"  # where each token's KLD is computed: "host" (llama-perplexity's arithmetic) or a device


@dataclass(frozen=True)
class VariantOutcome:
    id: str | None
    ok: bool
    error: str | None = None
    seconds: float | None = None
    result: KldResult | None = None
    kld_on: str | None = None  # the engine's Ready.kld_on, filled by Engine.evaluate


def argv(binary: Path, model: Path, logits: Path, candidates: Mapping[str, Path], *, ctx: int,
         threads: int | None = None, ngl: int | None = None) -> list[str]:
    args = [str(binary), "-m", str(model), "-c", str(ctx), "-lv", "4", "--no-log-timestamps",
            "--kl-divergence-base", str(logits), "--kl-divergence"] + thread_gpu_args(threads, ngl)
    for name, path in candidates.items():
        args += ["--engine-candidate", f"{name}={path}"]
    return args + ["--engine-variants", "-"]


def variant_line(vid: str, tensors: Mapping[str, str] | None = None, args: list[str] | None = None,
                 env: Mapping[str, str] | None = None) -> str:
    """One variant: tensor name -> candidate name, KV arguments, KV environment."""
    return json.dumps({"id": vid, "tensors": dict(tensors or {}), "args": list(args or []),
                       "env": dict(env or {})}) + "\n"


def kld_result(d: dict) -> KldResult:
    """The engine's statistics as the parser of a `--kl-divergence` log would give them."""
    return KldResult(
        kld_mean=d["kld_mean"], kld_mean_error=d["kld_mean_error"], kld_quantiles=dict(d["kld_quantiles"]),
        dp_mean_pct=d["dp_mean_pct"], dp_mean_error_pct=d["dp_mean_pct_error"],
        dp_quantiles_pct=dict(d["dp_quantiles_pct"]), dp_rms_pct=d["dp_rms_pct"],
        dp_rms_error_pct=d["dp_rms_pct_error"], same_top_p_pct=d["same_top_p_pct"],
        same_top_p_error_pct=d["same_top_p_pct_error"], ppl_q=d["ppl_q"], ppl_q_error=d["ppl_q_error"],
        ppl_base=d["ppl_base"], ppl_base_error=d["ppl_base_error"], ppl_ratio=d["ppl_ratio"],
        ppl_ratio_error=d["ppl_ratio_error"], ln_ppl_ratio=d["ln_ppl_ratio"],
        ln_ppl_ratio_error=d["ln_ppl_ratio_error"], ppl_diff=d["ppl_diff"], ppl_diff_error=d["ppl_diff_error"],
        ln_ppl_correlation_pct=d.get("ln_ppl_correlation_pct"), n_chunks=d.get("n_chunks"), n_ctx=d.get("n_ctx"),
        chunks=tuple(KldChunk(int(c[0]), *c[1:]) for c in d.get("chunks", ())))


def parse_line(line: str) -> Ready | VariantOutcome | None:
    """An engine line (ready, or a variant's outcome); None for every other line of the log."""
    line = strip_prefix(line.strip())
    if not line.startswith("{") or MARK not in line:  # the rest of the log never starts with "{"
        return None
    d = json.loads(line)
    if d["engine"] == "ready":
        return Ready(int(d["model_bytes"]), {k: int(v) for k, v in d["candidates"].items()}, d.get("kld_on", "host"))
    if d["ok"]:
        return VariantOutcome(d.get("id"), True, seconds=d.get("seconds"), result=kld_result(d["result"]))
    return VariantOutcome(d.get("id"), False, error=d.get("error") or "failed")


def fatal_line(text: str) -> str | None:
    """The engine's own refusal (`engine: ...`), the last one."""
    found = [strip_prefix(l) for l in text.splitlines() if strip_prefix(l).startswith("engine: ")]
    return found[-1] if found else None


class Engine:
    """A running engine: `start()` waits for it to be ready, `evaluate()` measures one variant."""

    def __init__(self, args: list[str], env: Mapping[str, str] | None = None, log_path: Path | None = None):
        self.args, self.env, self.log_path = args, env, log_path
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._in_flight = False  # a variant sent and not answered: closing then stops the engine at once
        self.ready: Ready | None = None
        self.startup_output = ""

    def _read_until_event(self, proc: subprocess.Popen) -> tuple[Ready | VariantOutcome | None, str]:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if self._log:
                self._log.write(line)
            event = parse_line(line)
            if event is not None:
                return event, "".join(lines)
        return None, "".join(lines)

    def start(self) -> Ready:
        full_env = dict(os.environ, **(self.env or {}))
        self._log = open(self.log_path, "a") if self.log_path else None  # noqa: SIM115 (closed by close())
        log.debug("starting %s", " ".join(self.args))
        try:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, errors="replace", env=full_env,
                                         start_new_session=True, bufsize=1,
                                         # dies with the thread that starts it, which a scan keeps (see base.py)
                                         preexec_fn=_tool_preexec())  # noqa: PLW1509 (see _tool_preexec)
        except OSError as exc:
            raise ToolError(f"could not start the engine ({Path(self.args[0]).name}): {exc}") from None
        try:
            event, text = self._read_until_event(self.proc)
        except BaseException:
            self.close()
            raise
        self.startup_output = text
        if not isinstance(event, Ready):
            self.close()
            raise ToolError(fatal_line(text) or f"the engine stopped before it was ready:\n{tail(text)}")
        self.ready = event
        return event

    def evaluate(self, vid: str, tensors: Mapping[str, str] | None = None, args: list[str] | None = None,
                 env: Mapping[str, str] | None = None) -> tuple[VariantOutcome, str, float]:
        """One variant's outcome, the engine's output for it, and its wall seconds (as lacq saw them)."""
        proc = self.proc
        assert proc is not None and proc.stdin is not None
        t0 = time.monotonic()
        self._in_flight = True
        try:
            proc.stdin.write(variant_line(vid, tensors, args, env))
            proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died; reading says so
        event, text = self._read_until_event(proc)
        self._in_flight = False
        if not isinstance(event, VariantOutcome):
            code = proc.wait()
            raise EngineCrashed(f"the engine ended (exit status {code}) while measuring {vid}:\n{tail(text, 8)}")
        if event.id != vid:
            raise ToolError(f"the engine answered for {event.id!r} while measuring {vid!r}")
        if self.ready is not None:
            event = replace(event, kld_on=self.ready.kld_on)
        return event, text, time.monotonic() - t0

    def close(self) -> None:
        """End of input: an idle engine exits (stopped if it does not within 10 s); one measuring a variant
        (Ctrl-C, SIGTERM, an error in lacq) is stopped at once."""
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                if self._in_flight:
                    stop_group(proc)
                if proc.stdin:
                    proc.stdin.close()
                proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                stop_group(proc)
            except BaseException:
                stop_group(proc)
                raise
            if proc.stdout:
                proc.stdout.close()
        if self._log:
            self._log.close()
            self._log = None
