"""A scan's engines sharded over GPUs without a GPU: a fake nvidia-smi and a stand-in engine that records the
argv and CUDA_VISIBLE_DEVICES it was started with; the flags that disagree, refused in one line."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from cliutil import assert_clean_error, run_cli

from lacq.llama.tools import engine as tool
from lacq.plan.kv.config import KvConfig
from lacq.results.store import open_store
from lacq.studies.engine import ENGINE_GPU_BYTES, EngineError, EngineSession, engine_workers, memory_plan
from lacq.studies.executor import Job, run_jobs
from lacq.studies.scan import ScanError, open_session

CAPTURE = "engine_smollm2_c128.log"

# Ready at once; for each variant, records (per process) its GPU, argv and the variants it measured, then
# answers with $RESULT; exits like a SIGKILL on the variant named in $CRASH_ON, the first time.
STAND_IN = r'''#!/usr/bin/env python3
import json, os, sys, time
record = {"gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "argv": sys.argv[1:], "variants": []}
out = os.path.join(os.environ["SEEN"], str(os.getpid()))
print('{"candidates":{"q8_0":1},"engine":"ready","model_bytes":2}', flush=True)
result = json.loads(open(os.environ["RESULT"]).read())
for line in sys.stdin:
    v = json.loads(line)
    record["variants"].append(v["id"])
    open(out, "w").write(json.dumps(record))
    if v["id"] == os.environ.get("CRASH_ON") and not os.path.exists(os.environ["MARKER"]):
        open(os.environ["MARKER"], "w").close()
        os._exit(137)
    time.sleep(0.05)  # long enough that every measuring thread gets variants
    print(json.dumps({"engine": "variant", "id": v["id"], "ok": True, "seconds": 0.05, "result": result}), flush=True)
'''


@pytest.fixture
def four_gpus(tmp_path, monkeypatch):
    """An nvidia-smi with GPUs 0-3 whose free memory (MiB) is $FREE_MIB_<id>, 80000 unless set."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("""#!/bin/sh
if [ "$1" = -L ]; then for i in 0 1 2 3; do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done; exit 0; fi
id=0
while [ $# -gt 0 ]; do [ "$1" = -i ] && id=$2; shift; done
case $id in 0|1|2|3) eval "echo \\${FREE_MIB_$id:-80000}";; *) exit 6;; esac
""")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{smi.parent}:{__import__('os').environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture
def stand_in(tmp_path, capture, monkeypatch):
    script = tmp_path / "llama-perplexity"
    script.write_text(STAND_IN.replace("#!/usr/bin/env python3", f"#!{sys.executable}"))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    line = next(line for line in capture(CAPTURE).splitlines()
                if (e := tool.parse_line(line)) is not None and getattr(e, "ok", False))
    (tmp_path / "result.json").write_text(json.dumps(json.loads(line[line.index("{"):])["result"]))
    (tmp_path / "seen").mkdir()
    monkeypatch.setenv("RESULT", str(tmp_path / "result.json"))
    monkeypatch.setenv("SEEN", str(tmp_path / "seen"))
    monkeypatch.setenv("MARKER", str(tmp_path / "crashed"))
    model, cand = tmp_path / "m.gguf", tmp_path / "q8.gguf"
    model.write_bytes(b"0" * 1000)
    cand.write_bytes(b"0" * 2000)
    return SimpleNamespace(build=SimpleNamespace(tool=lambda name: script), model=model, cand=cand,
                           seen=tmp_path / "seen")


def _engines_seen(seen: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(seen.iterdir())]


def test_each_gpu_gets_one_engine_started_with_only_that_gpu_visible(four_gpus, stand_in, monkeypatch, tmp_path):
    """--gpus 0,1,2,3: four engines with the same argv, each with CUDA_VISIBLE_DEVICES its own GPU; the variants
    spread over them, each measured once; an engine that crashes is restarted on the GPU it had."""
    monkeypatch.setenv("CRASH_ON", "v5")
    workers, gpus = engine_workers("cuda", None, "all", engine=True, ray=False)
    assert (workers, gpus) == (4, ["0", "1", "2", "3"])
    said = []
    session = EngineSession(stand_in.build, stand_in.model, None, tmp_path / "l.logits", {"q8_0": stand_in.cand},
                            ctx=128, gpus=gpus, note=said.append)
    assert said and "on each of 4 GPUs" in said[0] and "GPU 0 83.89 GB" in said[0]
    jobs = [Job(f"v{i}", i) for i in range(16)]
    try:
        run_jobs(jobs, lambda job, st: 0 if session.evaluate(job.key, {}, KvConfig())[0].ok else 1, open_store(),
                 "shards", workers=workers)
    finally:
        session.close()
    engines = _engines_seen(stand_in.seen)
    assert len(engines) == 5  # four, and the one that replaced the crashed engine
    assert all(e["argv"] == session.args[1:] for e in engines)
    assert "-ngl" not in session.args  # llama.cpp's default offload; the one GPU it sees is the engine's
    assert sorted({e["gpu"] for e in engines}) == gpus
    crashed = next(e for e in engines if e["variants"][-1] == "v5")
    successor = [e for e in engines if e["gpu"] == crashed["gpu"] and e is not crashed]
    assert len(successor) == 1 and successor[0]["variants"][0] == "v5"
    measured = [v for e in engines for v in e["variants"] if not (e is crashed and v == "v5")]
    assert sorted(measured) == sorted(j.key for j in jobs)  # each variant answered once


def test_gpu_memory_is_checked_on_each_gpu_and_the_tightest_refuses_by_name(four_gpus, stand_in, monkeypatch,
                                                                             tmp_path):
    monkeypatch.setenv("FREE_MIB_2", "500")
    plan = memory_plan(stand_in.model, {"q8_0": stand_in.cand}, None, ["0", "1", "2", "3"])
    assert (plan.gpu, plan.gpu_bytes, plan.host_bytes, plan.n_gpus) == ("2", 3000 + ENGINE_GPU_BYTES, 0, 4)
    with pytest.raises(EngineError, match=r"on each GPU and GPU 2 has 0\.52 GB free") as e:
        EngineSession(stand_in.build, stand_in.model, None, tmp_path / "l.logits", {"q8_0": stand_in.cand},
                      ctx=128, gpus=["0", "1", "2", "3"])
    assert "\n" not in str(e.value)
    assert not list(stand_in.seen.iterdir())  # refused before any engine started
    # GPU 2 left out: the others fit
    assert memory_plan(stand_in.model, {}, None, ["0", "3"]).gpu_free == 80000 << 20


def test_gpus_follow_cuda_visible_devices(four_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert engine_workers("cuda", None, "all", engine=True, ray=False) == (2, ["2", "3"])
    assert engine_workers("cuda", 1, "3", engine=True, ray=False) == (1, ["3"])
    with pytest.raises(EngineError, match=r"--gpus 0,2: not visible: 0 \(visible GPUs: 2, 3\)"):
        engine_workers("cuda", None, "0,2", engine=True, ray=False)
    assert engine_workers("cpu", None, None, engine=True, ray=False) == (1, [])
    assert engine_workers("cpu", None, None, engine=True, ray=True) == (None, [])  # Ray counts its actors


@pytest.mark.parametrize(("args", "message"), [
    (["--gpus", "0"], "--gpus runs an engine per GPU, and this build's backend is cpu; use --backend cuda"),
    (["--gpus", "0,1", "--jobs", "3", "--backend", "cuda"],
     "--gpus 0,1 runs 2 engines, one per GPU, and --jobs 3 disagrees; leave --jobs out"),
    (["--gpus", "0,7", "--backend", "cuda"], "--gpus 0,7: not visible: 7 (visible GPUs: 0, 1, 2, 3)"),
    (["--gpus", "0,0", "--backend", "cuda"], "--gpus 0,0: a GPU named twice"),
    (["--gpus", "0", "--backend", "cuda", "--no-engine"], "--gpus shards the evaluation engine's variants"),
    (["--executor", "ray", "--gpus", "0", "--backend", "cuda"], "--gpus is for engines on this machine"),
    (["--executor", "ray", "--no-engine"], "--executor ray shards the evaluation engine's variants"),
    (["--ray-address", "auto"], "--ray-address is for --executor ray"),
    (["--jobs", "0"], "--jobs must be at least 1, got 0"),
])
@pytest.mark.parametrize("scan", [["weights", "smollm2", "--base", "smollm2"], ["kv", "smollm2"]])
def test_sharding_flags_that_disagree_are_refused_in_one_line(four_gpus, scan, args, message):
    r = run_cli("scan", *scan, *args)
    assert_clean_error(r, message)
    assert len(r.output.strip().splitlines()) == 1


def test_a_scan_without_the_engine_refuses_gpus(tmp_path):
    build = SimpleNamespace(patches=(), tool=lambda name: tmp_path / name)  # a build made before the engine patch
    with pytest.raises(ScanError, match="shard the evaluation engine's variants"):
        open_session(build, tmp_path / "m.gguf", None, tmp_path / "l.logits", {}, ctx=128, threads=None, engine=True,
                     note=None, workers=2, gpus=["0", "1"], ray=None)


def test_a_gpu_build_without_ngl_plans_the_candidates_on_the_gpu(four_gpus, stand_in):
    """llama.cpp offloads every layer on a CUDA build when -ngl is not given: the memory said up front is the
    GPU's (an H100 scan of the synthetic 8B said "host 13.07 GB, mmap'd" while 12.8 GB sat on the GPU)."""
    cands = {"q8_0": stand_in.cand}
    on_gpu = memory_plan(stand_in.model, cands, None, gpu_backend=True)
    assert (on_gpu.gpu_bytes, on_gpu.host_bytes) == (3000 + ENGINE_GPU_BYTES, 0) and on_gpu.gpu_free is not None
    assert "GPU" in on_gpu.describe()
    assert memory_plan(stand_in.model, cands, 0, gpu_backend=True).host_bytes == 3000  # -ngl 0: the host
    assert memory_plan(stand_in.model, cands, None, gpu_backend=False).host_bytes == 3000  # a CPU build


def _logits_header(path: Path, n_ctx: int, n_vocab: int, n_chunk: int) -> Path:
    """The first 20 bytes of a --kl-divergence-base file (what the memory plan reads of it)."""
    path.write_bytes(b"_logits_" + n_ctx.to_bytes(4, "little") + n_vocab.to_bytes(4, "little")
                     + n_chunk.to_bytes(4, "little"))
    return path


def test_engines_sharing_a_gpu_and_the_kld_on_the_gpu_are_planned(four_gpus, stand_in, monkeypatch, tmp_path):
    """--jobs 4 on one GPU runs four engines, each with the model, its candidates, the KL-divergence's base
    log-probabilities (4x512 tokens of Llama-3's 128,256-token vocabulary: 1.70 GB) and its own context on the
    device (an H100 held 0.69-0.79 GB per engine beyond files and KLD; 1 GB is planned)."""
    logits = _logits_header(tmp_path / "l.logits", 512, 128256, 4)
    cands = {"q8_0": stand_in.cand}
    one = memory_plan(stand_in.model, cands, None, gpu_backend=True, logits=logits)
    kld = (2 * 255 * 4 + 5 * 255) * 128256 * 4
    assert (one.kld_bytes, one.gpu_bytes, one.engines_per_gpu) == (kld, 3000 + kld + ENGINE_GPU_BYTES, 1)
    assert "1.70 GB of it the KLD's base log-probabilities, 1.07 GB the engine's context" in one.describe()
    four = memory_plan(stand_in.model, cands, None, gpu_backend=True, logits=logits, engines_per_gpu=4)
    assert four.gpu_bytes == 4 * (3000 + kld + ENGINE_GPU_BYTES) and "4 engines sharing the GPU" in four.describe()
    # on the host (a CPU build, -ngl 0) the engines share the mmap'd files and the KLD runs on the host
    host = memory_plan(stand_in.model, cands, 0, gpu_backend=True, logits=logits, engines_per_gpu=4)
    assert (host.host_bytes, host.gpu_bytes, host.kld_bytes) == (3000, 0, 0)
    monkeypatch.setenv("FREE_MIB_0", "9000")  # 9.44 GB: one engine fits, four do not
    EngineSession(stand_in.build, stand_in.model, None, logits, cands, ctx=512, gpus=["0"]).close()
    with pytest.raises(EngineError, match=r"needs 11\.10 GB of GPU memory for the model and its candidates "
                                          r"\(4 engines\) and the GPU has 9\.44 GB free"):
        EngineSession(SimpleNamespace(tool=stand_in.build.tool, backend="cuda"), stand_in.model, None, logits,
                      cands, ctx=512, engines_per_gpu=4)
    assert not list(stand_in.seen.iterdir())  # refused before any engine started


def test_a_header_that_is_not_base_logits_plans_no_kld_memory(tmp_path):
    from lacq.studies.engine import kld_device_bytes
    assert kld_device_bytes(None) == 0 and kld_device_bytes(tmp_path / "missing") == 0
    (tmp_path / "short").write_bytes(b"_logits_")
    (tmp_path / "other").write_bytes(b"GGUF" + bytes(16))
    assert kld_device_bytes(tmp_path / "short") == 0 and kld_device_bytes(tmp_path / "other") == 0
