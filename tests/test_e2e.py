"""End to end on the real pinned llama.cpp (CPU build, cached) and real SmolLM2-135M."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import _lacq_home

from lacq.cli import cli
from lacq.llama.build import BuildSpec, build
from lacq.model.info import inspect_model
from lacq.results.store import open_store

pytestmark = pytest.mark.e2e


def lacq(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def test_second_build_is_a_noop(cpu_build):
    t0 = time.monotonic()
    again = build(BuildSpec(backend="cpu"))
    assert again.key == cpu_build.key
    assert time.monotonic() - t0 < 5
    for tool in ("llama-quantize", "llama-perplexity", "llama-bench", "llama-completion"):
        assert cpu_build.tool(tool).exists()
    assert cpu_build.patches == tuple(p.strip() for p in
                                      (Path(__file__).parent.parent / "patches" / "series").read_text().splitlines()
                                      if p.strip() and not p.startswith("#"))


@pytest.fixture(scope="module")
def quantized(cpu_build, smollm2_f16, e2e_home, tmp_path_factory):
    out = tmp_path_factory.mktemp("q")
    paths = {}
    with _lacq_home(e2e_home):
        for recipe in ("first8_q8", "uniform_q4_0"):
            target = out / f"{recipe}.gguf"
            r = CliRunner().invoke(cli, ["quantize", "--recipe", recipe, str(smollm2_f16), "-o", str(target)])
            assert r.exit_code == 0, r.output
            assert "wrote" in r.output
            paths[recipe] = target
    return paths


def test_first8_q8_has_blocks_0_to_7_at_q8_0(quantized):
    info = inspect_model(quantized["first8_q8"])
    for t in info.tensors:
        if t.block is None or len(t.shape) < 2:
            continue
        assert t.type == ("q8_0" if t.block < 8 else "q4_0"), (t.name, t.type)
    uniform = inspect_model(quantized["uniform_q4_0"])
    assert {t.type for t in uniform.tensors if t.block is not None and len(t.shape) > 1} == {"q4_0"}
    assert quantized["first8_q8"].stat().st_size > quantized["uniform_q4_0"].stat().st_size


def test_inspect_json_agrees(quantized):
    r = lacq("inspect", quantized["first8_q8"], "--json")
    assert r.exit_code == 0
    data = json.loads(r.output)
    assert data["n_blocks"] == 30 and data["kv_blocks"] == list(range(30))


def test_same_plan_again_is_skipped_and_existing_output_refused(quantized, smollm2_f16):
    target = quantized["first8_q8"]
    mtime = target.stat().st_mtime_ns
    r = lacq("quantize", "--recipe", "first8_q8", smollm2_f16, "-o", target)
    assert r.exit_code == 0 and "up to date" in r.output, r.output
    r = lacq("quantize", "--recipe", "last4_q8", smollm2_f16, "-o", target)
    assert r.exit_code != 0 and "--force" in r.output and "Traceback" not in r.output
    assert target.stat().st_mtime_ns == mtime


def test_the_same_plan_written_elsewhere_leaves_the_first_file_up_to_date(quantized, smollm2_f16, tmp_path):
    """The cache keeps one path per key: quantizing the same plan to a second path moved the key there, and a
    rerun of the first command was refused as if its file were someone else's."""
    first = quantized["uniform_q4_0"]
    r = lacq("quantize", "--recipe", "uniform_q4_0", smollm2_f16, "-o", tmp_path / "again.gguf")
    assert r.exit_code == 0 and "wrote" in r.output, r.output
    mtime = first.stat().st_mtime_ns
    r = lacq("quantize", "--recipe", "uniform_q4_0", smollm2_f16, "-o", first)
    assert r.exit_code == 0 and "up to date" in r.output, r.output
    assert first.stat().st_mtime_ns == mtime


def test_dry_run_writes_nothing(smollm2_f16, tmp_path):
    target = tmp_path / "x.gguf"
    r = lacq("quantize", "--recipe", "ffn_q8", smollm2_f16, "-o", target, "--dry-run", "--strict")
    assert r.exit_code == 0, r.output
    assert "would write" in r.output and not target.exists()


def test_ppl_and_report(quantized):
    for recipe, path in quantized.items():
        r = lacq("ppl", path, "--chunks", "3", "--label", recipe, "--study", "e2e")
        assert r.exit_code == 0, r.output
        assert "PPL = " in r.output
    results = open_store().results(kind="ppl", study="e2e")
    assert {r.label for r in results} == {"first8_q8", "uniform_q4_0"}
    by = {r.label: r.metrics for r in results}
    for m in by.values():
        assert len(m["chunks"]) == 3 and m["ppl"] == m["chunks"][-1]
        assert 10 < m["ppl"] < 100
    assert by["first8_q8"]["ppl"] < by["uniform_q4_0"]["ppl"]  # 8 blocks at q8_0 help on this model
    r = lacq("report", "--study", "e2e", "--format", "csv")
    assert r.exit_code == 0 and "first8_q8" in r.output and "uniform_q4_0" in r.output


def test_quantized_kv_cache_runs_with_flash_attention(quantized):
    r = lacq("ppl", quantized["uniform_q4_0"], "--chunks", "2", "--ctk", "q8_0", "--ctv", "q4_0")
    assert r.exit_code == 0, r.output
    (res,) = open_store().results(kind="ppl")
    assert res.metrics["k_type"] == "q8_0" and res.metrics["v_type"] == "q4_0"
    assert res.metrics["flash_attn"] == "enabled"
    assert res.kv["flash_attn"] == "on"


def test_tool_failure_shows_log(cpu_build, quantized, tmp_path):
    # Long enough in bytes to pass lacq's own length check (a token covers at least a byte), too short in
    # tokens for llama-perplexity (about 5 bytes a token): the tool itself refuses, and its words reach the user.
    corpus = tmp_path / "short.txt"
    corpus.write_text("far too short to evaluate. " * 60)
    r = lacq("ppl", quantized["uniform_q4_0"], "-f", corpus, "--chunks", "1")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "you need at least" in r.output


def test_llama_cpp_refusing_a_model_shows_its_log(cpu_build, tmp_path):
    from synth import write_synthetic_gguf
    model = write_synthetic_gguf(tmp_path / "no-tokenizer.gguf", n_blocks=2)
    r = lacq("ppl", model, "--chunks", "1")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "llama-perplexity exited with status" in r.output
    # llama.cpp's async logger sometimes exits before writing anything; then lacq says so
    assert "last lines of its log" in r.output or "printed nothing" in r.output


def _start(args, sigint=signal.SIG_DFL) -> subprocess.Popen:
    """Start `lacq ARGS` with the signal dispositions a terminal gives, whatever pytest inherited:
    a shell that starts pytest in the background (`nohup … &`, some CI runners) leaves SIGINT
    (and with nohup SIGHUP) ignored, children inherit that, and a signal the test sends would
    do nothing. `sigint=signal.SIG_IGN` starts lacq as such a background job instead."""

    def dispositions():
        signal.signal(signal.SIGINT, sigint)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    return subprocess.Popen([sys.executable, "-m", "lacq", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ),
                            preexec_fn=dispositions)  # noqa: PLW1509  (pytest runs the tests in one thread)


def _wait_until(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be interrupted"


def _interrupt(args, ready, tmp_path, sig=signal.SIGINT) -> subprocess.CompletedProcess:
    """Start `lacq ARGS`, wait until `ready()` holds, send Ctrl-C (SIGINT) or `sig`."""
    proc = _start(args)
    _wait_until(proc, ready)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(args, proc.returncode, out)


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`: pid -> command name (from /proc/*/stat; Linux)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited while we looked
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if int(rest[1]) == pid:
            out[int(stat.parent.name)] = name
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_ctrl_c_during_quantize_leaves_no_partial_file(smollm2_f16, tmp_path):
    target = tmp_path / "out" / "interrupted.gguf"
    target.parent.mkdir()
    done = _interrupt(["quantize", "--recipe", "uniform_q4_0", smollm2_f16, "-o", target],
                      lambda: any(target.parent.glob("*.part")), tmp_path)
    assert done.returncode == 130, done.stdout
    assert "interrupted" in done.stdout and "Traceback" not in done.stdout
    assert list(target.parent.iterdir()) == []


def test_ctrl_c_during_ppl_stores_nothing(quantized, tmp_path):
    t0 = time.monotonic()
    done = _interrupt(["ppl", quantized["uniform_q4_0"], "--chunks", "8"],
                      lambda: time.monotonic() - t0 > 4, tmp_path)
    assert done.returncode == 130, done.stdout
    assert "Traceback" not in done.stdout
    assert open_store().results(kind="ppl") == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_during_long_ppl_stops_llama_perplexity_and_stores_nothing(smollm2, cpu_build, sig):
    # A long context: one chunk takes far longer than the test waits, as in a CI timeout.
    proc = _start(["ppl", smollm2, "-c", "8192", "--chunks", "2"])
    tool: list[int] = []

    def computing() -> bool:
        tool[:] = [p for p, name in _children(proc.pid).items() if name.startswith("llama-perplex")]
        return bool(tool)

    try:
        _wait_until(proc, computing)
        time.sleep(2)  # past loading the model: computing the first chunk
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, (proc.returncode, out)
        assert f"terminated by {signal.Signals(sig).name}" in out and "Traceback" not in out
        assert not _alive(tool[0]), "llama-perplexity survived lacq"
        assert open_store().results() == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in tool:  # a survivor (the bug this test is about) must not run on for minutes
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_lacq_started_with_sigint_ignored_keeps_it_ignored(smollm2, cpu_build):
    # Unix convention: a background job (started with SIGINT ignored) must not die on the
    # terminal's Ctrl-C; lacq and the tool it runs keep the inherited disposition.
    proc = _start(["ppl", smollm2, "--chunks", "2"], sigint=signal.SIG_IGN)
    try:
        _wait_until(proc, lambda: any(n.startswith("llama-perplex") for n in _children(proc.pid).values()))
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "PPL = " in out
    assert len(open_store().results(kind="ppl")) == 1


@pytest.mark.parametrize("command", [
    ["ppl", "--chunks", "2", "-c", "128"],
    ["kld", "--chunks", "2", "-c", "128"],
    ["bench", "--pp", "32", "--tg", "4", "-r", "1"],
    ["niah", "--ctx", "256", "--depths", "50", "--trials", "1", "--runner", "completion"],
], ids=lambda c: c[0])
def test_json_prints_the_stored_result_alone_and_progress_is_plain_lines_in_a_log(smollm2, cpu_build, command):
    name, *rest = command
    base = ["--base", smollm2] if name == "kld" else []
    # stderr a pipe, as a log file or CI is: not a terminal
    done = subprocess.run([sys.executable, "-m", "lacq", name, smollm2, *base, *rest, "--ctk", "q8_0", "--ctv", "q4_0",
                           "--boundary", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)  # one object and nothing else on stdout
    (stored,) = open_store().results(kind=name)
    assert out["id"] == stored.id and out["kind"] == name and out["metrics"] == json.loads(json.dumps(stored.metrics))
    layers = out["kv"]["layers"]
    assert [(l["block"], l["ordinal"]) for l in layers] == [(i, i) for i in range(30)]
    assert [l["v"] for l in layers] == ["q8_0"] + ["q4_0"] * 28 + ["q8_0"] and {l["k"] for l in layers} == {"q8_0"}
    assert out["kv"]["v_bits_per_value"] == pytest.approx((2 * 8.5 + 28 * 4.5) / 30)
    assert out["build"]["build_key"] == cpu_build.key and out["model_sha256"]
    assert out["machine"]["cpu"]  # where it ran: the CPU, and the ggml CPU features the tool reported
    if name in ("ppl", "kld"):
        assert "REPACK" in out["machine"]["ggml_cpu"] or "NEON" in out["machine"]["ggml_cpu"], out["machine"]
    # progress: plain lines (no bar redrawn), at least the stage's start and end
    assert "━" not in done.stderr and "\r" not in done.stderr
    lines = [l for l in done.stderr.splitlines() if l.startswith("[")]
    assert len(lines) >= 2 and lines[-1].split("] ", 1)[1].split(":")[1].strip().startswith("100%"), done.stderr
