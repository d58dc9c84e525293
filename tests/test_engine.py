"""The evaluation engine's wrapper and scan glue without llama.cpp: its parser on captured output, a stand-in
engine for the process protocol (crash, refusal), the variant's tensors, the memory refusal."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import lacq.studies.engine as studies_engine
from lacq.errors import ToolError
from lacq.llama.tools import engine as tool
from lacq.llama.tools import kld
from lacq.plan.kv.config import KvConfig
from lacq.studies.engine import EngineError, Engines, EngineSession, MemoryPlan, check_memory
from lacq.studies.scan import WeightVariant, engine_tensors

CAPTURE = "engine_smollm2_c128.log"  # llama-perplexity --engine-variants: ready, two variants, one refused


def _variants(text: str) -> list[tool.VariantOutcome]:
    return [e for line in text.splitlines() if isinstance(e := tool.parse_line(line), tool.VariantOutcome)]


def test_parse_reads_the_ready_line_and_each_variant(capture):
    text = capture(CAPTURE)
    (ready,) = [e for line in text.splitlines() if isinstance(e := tool.parse_line(line), tool.Ready)]
    assert ready.candidates and all(v > 0 for v in ready.candidates.values()) and ready.model_bytes > 0
    ok, bad = [v for v in _variants(text) if v.ok], [v for v in _variants(text) if not v.ok]
    assert bad and bad[0].error == "the model has no tensor blk.99.ffn_down.weight"
    r = ok[0].result
    assert r.n_chunks == 2 and r.n_ctx == 128 and len(r.chunks) == 2 and r.chunks[-1].kld == pytest.approx(r.kld_mean)
    assert set(r.kld_quantiles) == {"max", "p99.9", "p99", "p95", "p90", "p50", "p10", "p5", "p1", "p0.1", "min"}
    assert r.kld_quantiles["min"] <= r.kld_quantiles["p50"] <= r.kld_quantiles["p99.9"] <= r.kld_quantiles["max"]


@pytest.mark.parametrize("log", [CAPTURE, "engine_cuda_kld_device.log"])  # KLD on the host; on an H100
def test_the_engine_s_numbers_are_those_its_text_prints(capture, log):
    """Each variant's JSON against the text llama-perplexity prints for it (parsed by tools/kld.py): the same
    statistics, to the digits printed."""
    text = capture(log)
    lines = text.splitlines()
    ends = [i for i, line in enumerate(lines) if isinstance(tool.parse_line(line), tool.VariantOutcome)]
    start = 0
    checked = 0
    for end in ends:
        outcome = tool.parse_line(lines[end])
        if outcome.ok:
            printed = kld.parse("\n".join(lines[start:end]))
            for name in ("kld_mean", "kld_mean_error", "ppl_q", "ppl_base", "ln_ppl_ratio", "ppl_ratio", "ppl_diff"):
                assert f"{getattr(outcome.result, name):.6f}" == f"{getattr(printed, name):.6f}", name
            for name in ("same_top_p_pct", "dp_rms_pct", "dp_mean_pct"):
                assert f"{getattr(outcome.result, name):.3f}" == f"{getattr(printed, name):.3f}", name
            assert {k: f"{v:.6f}" for k, v in outcome.result.kld_quantiles.items()} == \
                {k: f"{v:.6f}" for k, v in printed.kld_quantiles.items()}
            assert [f"{c.kld:.5f}" for c in outcome.result.chunks] == [f"{c.kld:.5f}" for c in printed.chunks]
            checked += 1
        start = end + 1
    assert checked >= 2


def test_argv_names_each_candidate_and_reads_variants_from_stdin():
    args = tool.argv(Path("/b/llama-perplexity"), Path("m.gguf"), Path("l.logits"),
                     {"q8_0": Path("/c/q8.gguf")}, ctx=512, threads=2)
    assert args[-4:] == ["--engine-candidate", "q8_0=/c/q8.gguf", "--engine-variants", "-"]
    assert "--kl-divergence" in args and args[args.index("-t") + 1] == "2"
    line = json.loads(tool.variant_line("v", {"a": "q8_0"}, ["-ctk", "q8_0"], {"LLAMA_KV_TYPES_V": "0=q4_0"}))
    assert line == {"id": "v", "tensors": {"a": "q8_0"}, "args": ["-ctk", "q8_0"],
                    "env": {"LLAMA_KV_TYPES_V": "0=q4_0"}}


# A stand-in engine: says it is ready, answers each variant with the result in $RESULT, and dies (SIGKILL-like,
# exit 137) on the variant whose id is in $CRASH_ON the first time ($MARKER records that it did).
STAND_IN = r'''
import json, os, sys
if os.environ.get("REFUSE"):
    print("I some log line")
    print("E engine: candidate q8_0 (/x.gguf) is not the model quantized otherwise: no tensor output.weight")
    sys.exit(1)
print('{"candidates":{"q8_0":1},"engine":"ready","model_bytes":2}', flush=True)
result = json.loads(open(os.environ["RESULT"]).read())
for line in sys.stdin:
    v = json.loads(line)
    if v["id"] == os.environ.get("HANG_ON"):
        import time; time.sleep(60)
    if v["id"] == os.environ.get("CRASH_ON") and not os.path.exists(os.environ["MARKER"]):
        open(os.environ["MARKER"], "w").close()
        os._exit(137)
    print("some text of the variant")
    print(json.dumps({"engine": "variant", "id": v["id"], "ok": True, "seconds": 0.1, "result": result}), flush=True)
'''


@pytest.fixture
def stand_in(tmp_path, capture, monkeypatch):
    script = tmp_path / "engine.py"
    script.write_text(STAND_IN)
    line = next(line for line in capture(CAPTURE).splitlines()
                if (e := tool.parse_line(line)) is not None and getattr(e, "ok", False))
    (tmp_path / "result.json").write_text(json.dumps(json.loads(line[line.index("{"):])["result"]))
    monkeypatch.setenv("RESULT", str(tmp_path / "result.json"))
    monkeypatch.setenv("MARKER", str(tmp_path / "crashed"))
    return [sys.executable, str(script)]


def test_a_refusal_is_the_engine_s_one_line(stand_in, monkeypatch):
    monkeypatch.setenv("REFUSE", "1")
    with pytest.raises(ToolError) as e:
        tool.Engine(stand_in).start()
    assert str(e.value) == ("engine: candidate q8_0 (/x.gguf) is not the model quantized otherwise: "
                            "no tensor output.weight")


def test_a_crash_mid_variant_is_reported_and_the_session_restarts_the_engine(stand_in, tmp_path, monkeypatch):
    monkeypatch.setenv("CRASH_ON", "second")
    eng = tool.Engine(stand_in)
    eng.start()
    assert eng.evaluate("first")[0].ok
    with pytest.raises(tool.EngineCrashed, match="exit status 137.*second"):
        eng.evaluate("second")
    eng.close()
    os.remove(tmp_path / "crashed")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"0")
    build = SimpleNamespace(tool=lambda name: Path(stand_in[1]))
    session = EngineSession(build, model, None, tmp_path / "l.logits", {}, ctx=128)
    session.engines = Engines(stand_in)  # the stand-in takes no llama.cpp arguments
    try:
        assert session.evaluate("first", {}, KvConfig())[0].ok
        outcome, _, _ = session.evaluate("second", {}, KvConfig())  # crashes once, measured again
        assert outcome.ok and outcome.id == "second" and len(session.engines._all) == 2
        engines = list(session.engines._all)
    finally:
        session.close()
    assert all(e.proc is None for e in engines)  # closed, the crashed one and its successor


def test_memory_that_cannot_fit_is_refused_with_the_numbers():
    with pytest.raises(EngineError, match=r"needs 30\.00 GB of host memory .* 20\.00 GB are available"):
        check_memory(MemoryPlan(host_bytes=30 * 10**9, gpu_bytes=0, host_free=20 * 10**9, gpu_free=None))
    with pytest.raises(EngineError, match=r"needs 90\.00 GB of GPU memory .* has 80\.00 GB free"):
        check_memory(MemoryPlan(host_bytes=0, gpu_bytes=90 * 10**9, host_free=None, gpu_free=80 * 10**9))
    check_memory(MemoryPlan(host_bytes=10**9, gpu_bytes=0, host_free=8 * 10**9, gpu_free=None))
    assert "host 1.00 GB" in MemoryPlan(10**9, 0, 8 * 10**9, None).describe()


def _info(types: dict[str, str]):
    tensors = [SimpleNamespace(name=n, type=t) for n, t in types.items()]
    return SimpleNamespace(tensors=tensors, tensor=lambda n: next(t for t in tensors if t.name == n))


def test_a_variant_swaps_only_the_tensors_that_differ_from_the_engine_s_model():
    """The engine's model is the lowest candidate's file: a tensor named by the variant comes from its type's
    file, every other from the default's, and one of the same type there (llama.cpp's fallbacks, norms) stays."""
    cinfo = {"q4_0": _info({"a": "q4_0", "b": "q4_0", "norm": "f32", "c": "q5_0"}),
             "q8_0": _info({"a": "q8_0", "b": "q8_0", "norm": "f32", "c": "q5_0"})}
    assert engine_tensors(WeightVariant("q4_0", ("a",), "q8_0"), cinfo, "q4_0") == {"a": "q8_0"}
    assert engine_tensors(WeightVariant("q8_0", ("a",), "q4_0"), cinfo, "q4_0") == {"b": "q8_0"}
    assert engine_tensors(WeightVariant("q8_0", (), "q8_0"), cinfo, "q4_0") == {"a": "q8_0", "b": "q8_0"}
    assert engine_tensors(WeightVariant("q4_0", ("c",), "q8_0"), cinfo, "q4_0") == {}


def test_a_scan_that_cannot_fit_is_refused_before_any_engine_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(studies_engine, "host_available", lambda: 512 * 10**6)
    model, cand = tmp_path / "m.gguf", tmp_path / "q8.gguf"
    model.write_bytes(b"0" * 1000)
    cand.write_bytes(b"0" * 2000)
    said = []
    build = SimpleNamespace(tool=lambda name: Path("/nonexistent/llama-perplexity"))
    with pytest.raises(EngineError, match=r"needs 0\.00 GB of host memory .* 0\.51 GB are available") as e:
        EngineSession(build, model, None, tmp_path / "l.logits", {"q8_0": cand}, ctx=128, note=said.append)
    assert "\n" not in str(e.value)
    assert said == [("engine memory: host 0.00 GB (model and candidate files, mmap'd; tensors llama.cpp repacks for "
                    "this CPU are copied); free: host 0.51 GB")]


def test_ctrl_c_during_a_variant_stops_the_engine_at_once(stand_in, monkeypatch):
    monkeypatch.setenv("HANG_ON", "slow")
    eng = tool.Engine(stand_in)
    eng.start()
    proc = eng.proc

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(1)
    try:
        with pytest.raises(KeyboardInterrupt):
            eng.evaluate("slow")
        t0 = time.monotonic()
        eng.close()
        assert time.monotonic() - t0 < 5 and proc.poll() is not None  # not left to finish its 60 s variant
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_ready_says_where_the_kld_is_computed(capture):
    """An H100 engine (patch 0018, the SmolLM2-shaped model of bench/gpu/engine_smol.sh) computes the KLD on
    CUDA0; an engine without a GPU, or one made before the device KLD, on the host. The variant carries it."""
    ready = [e for line in capture("engine_cuda_kld_device.log").splitlines()
             if isinstance(e := tool.parse_line(line), tool.Ready)]
    assert [r.kld_on for r in ready] == ["CUDA0"]
    (old,) = [e for line in capture(CAPTURE).splitlines() if isinstance(e := tool.parse_line(line), tool.Ready)]
    assert old.kld_on == "host"
    v = _variants(capture("engine_cuda_kld_device.log"))[0]
    assert v.ok and v.id == "uniform" and v.kld_on is None  # Engine.evaluate fills it from its Ready
