import io
import json

from rich.console import Console

from lacq.results.render import render
from lacq.results.store import Store
from lacq.results.tables import ppl_frame


def _add(store, model, label, ppl, **kw):
    return store.add(kind="ppl", label=label, model=model, build={"build_key": "k"}, command=["x"],
                     metrics={"ppl": ppl, "ppl_error": 0.1, "k_bits_per_value": 16.0, "v_bits_per_value": 16.0},
                     study="s", **kw)


def _models(tmp_path, sizes):
    out = {}
    for name, size in sizes.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(b"\0" * size)
        out[name] = p
    return out


def test_migrations_are_idempotent_and_rows_keep_provenance(tmp_path):
    db = tmp_path / "r.sqlite"
    m = _models(tmp_path, {"a": 1000})
    store = Store(db)
    rid = _add(store, m["a"], "A", 10.0, ctx=512, chunks=4, kv={"k": "f16"})
    store.close()
    store = Store(db)  # reopening applies nothing twice
    (r,) = store.results(kind="ppl")
    assert r.id == rid and r.label == "A" and r.ctx == 512 and r.kv == {"k": "f16"}
    assert r.model_bytes == 1000 and len(r.model_sha256) == 64 and r.host


def test_sha256_cache_follows_content(tmp_path):
    store = Store(tmp_path / "r.sqlite")
    p = tmp_path / "f.bin"
    p.write_bytes(b"one")
    h1 = store.sha256(p)
    p.write_bytes(b"two!")
    assert store.sha256(p) != h1


def test_ppl_frame_deltas_compression_and_marks(tmp_path):
    m = _models(tmp_path, {"base": 4000, "small": 1000, "mid": 1500, "bad": 1600})
    store = Store(tmp_path / "r.sqlite")
    _add(store, m["base"], "F16 base", 10.0)
    _add(store, m["small"], "uniform", 12.0)
    _add(store, m["mid"], "first8", 10.5)
    _add(store, m["bad"], "last4", 11.8)  # bigger and worse than first8: not on the front
    df = ppl_frame(store.results(), base_label="F16 base").set_index("configuration")
    assert abs(df.loc["uniform", "ppl_delta_pct"] - 20.0) < 1e-9
    assert abs(df.loc["first8", "compression"] - 4000 / 1500) < 1e-9
    assert df.loc["F16 base", "mark"] == "base"
    assert df.loc["first8", "mark"].startswith("★")
    assert df.loc["last4", "mark"] == ""
    assert df.loc["uniform", "mark"] == "pareto"


def test_latest_result_per_label_wins(tmp_path):
    m = _models(tmp_path, {"a": 100})
    store = Store(tmp_path / "r.sqlite")
    _add(store, m["a"], "A", 10.0)
    _add(store, m["a"], "A", 11.0)
    assert list(ppl_frame(store.results()).ppl) == [11.0]


def test_render_formats(tmp_path):
    m = _models(tmp_path, {"base": 4000, "small": 1000})
    store = Store(tmp_path / "r.sqlite")
    _add(store, m["base"], "F16 base", 10.0)
    _add(store, m["small"], "uniform", 12.0)
    df = ppl_frame(store.results())
    outs = {}
    for fmt in ("table", "md", "csv", "json"):
        buf = io.StringIO()
        render(df, fmt, Console(file=buf, width=200))
        outs[fmt] = buf.getvalue()
    assert "| Configuration |" in outs["md"] and "+20.00%" in outs["md"]
    assert outs["csv"].splitlines()[0].startswith("configuration,size_mb,ppl")
    rows = json.loads(outs["json"])
    assert {r["configuration"] for r in rows} == {"F16 base", "uniform"}
    assert "uniform" in outs["table"]


def test_report_joins_kld_and_niah_and_sorts_by_kld(tmp_path):
    from lacq.results.tables import combined_frame
    m = _models(tmp_path, {"base": 4000, "a": 1000, "b": 1200})
    store = Store(tmp_path / "r.sqlite")
    _add(store, m["base"], "F16 base", 10.0)
    _add(store, m["a"], "a", 12.0)
    _add(store, m["b"], "b", 11.0)
    for label, model, kld in (("a", m["a"], 0.30), ("b", m["b"], 0.10)):
        store.add(kind="kld", label=label, model=model, build={}, command=[], study="s",
                  metrics={"kld_mean": kld, "kld_mean_error": 0.01, "kld_quantiles": {"p99": 1.0, "max": 3.0},
                           "dp_rms_pct": 5.0, "same_top_p_pct": 80.0, "ppl_q": 11.0, "ppl_ratio": 1.1})
    store.add(kind="niah", label="a", model=m["a"], build={}, command=[], study="s",
              metrics={"pass_rate": 0.5, "trials": 2, "grid": [{"length": 1024, "passed": 1, "n": 2}]})
    df, cols = combined_frame(store.results())
    assert list(df.configuration) == ["F16 base", "b", "a"]  # base first, then KLD order (not PPL)
    assert {"kld_mean", "ppl", "niah_pass_pct"} <= set(cols)
    assert df.set_index("configuration").loc["a", "niah_pass_pct"] == 50.0
    only_ppl, cols = combined_frame([r for r in store.results() if r.kind == "ppl"])
    assert "kld_mean" not in cols


def test_system_info_gives_the_ggml_cpu_features(capture):
    from lacq.llama.tools.base import system_info
    info = system_info(capture("kv_policy_smollm2.log"))
    assert info == {"CPU": ["SSE3", "SSSE3", "AVX", "AVX_VNNI", "AVX2", "F16C", "FMA", "BMI2", "AVX512",
                            "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "LLAMAFILE", "OPENMP", "REPACK"]}
    assert system_info("no such line") is None
    line = "system_info: n_threads = 8 | CUDA : ARCHS = 900 | USE_GRAPHS = 1 | CPU : AVX2 = 1 | AVX512 = 0 |"
    assert system_info(line) == {"CUDA": ["ARCHS=900", "USE_GRAPHS"], "CPU": ["AVX2"]}


def test_results_record_the_machine_and_report_shows_it(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lacq.cli import cli
    from lacq.measure.common import machine_record
    db = tmp_path / "r.sqlite"
    m = _models(tmp_path, {"a": 1000, "b": 900})
    store = Store(db)
    here = machine_record("I system_info: n_threads = 2 | CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | ")
    assert here["ggml_cpu"] == ["SSE3", "AVX2", "AVX512"] and here["cpu"]
    _add(store, m["a"], "A", 10.0, machine=here)
    _add(store, m["b"], "B", 11.0, machine={**here, "cpu": "Other CPU", "ggml_cpu": ["AVX2"]})
    _add(store, m["b"], "C", 12.0)  # stored before machines were recorded
    store.close()
    assert Store(db).get(1).machine == here
    r = CliRunner().invoke(cli, ["--db", str(db), "report", "--format", "md"])
    assert r.exit_code == 0, r.output
    assert f"measured on {here['cpu']} (ggml CPU: SSE3 AVX2 AVX512): A" in r.output
    assert "measured on Other CPU (ggml CPU: AVX2): B" in r.output
    assert "rows come from 2 machines" in r.output and "1 result(s) carry no machine record" in r.output
