"""Bad input through the CLI: a short error, a non-zero exit, no traceback, no partial file.

These need no llama.cpp build: lacq refuses before any tool runs.
"""

import sys

import pytest
from cliutil import assert_clean_error, run_cli
from synth import write_synthetic_gguf

from lacq.errors import ToolError
from lacq.llama.tools.base import run_tool


def test_not_a_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("just text, no magic")
    assert_clean_error(run_cli("inspect", p), "not a GGUF")


def test_truncated_gguf(tmp_path):
    p = write_synthetic_gguf(tmp_path / "t.gguf", truncate=True)
    assert_clean_error(run_cli("inspect", p), "truncated")


def test_missing_model(tmp_path):
    assert_clean_error(run_cli("ppl", tmp_path / "nope.gguf"), "does not exist")


def _recipe(tmp_path, body):
    p = tmp_path / "r.toml"
    p.write_text('name = "r"\ndescription = "test"\nbase = "q4_0"\n' + body)
    return p


def test_recipe_unknown_type(tmp_path):
    m = write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=4)
    r = _recipe(tmp_path, '[[rules]]\nlayers = "first:1"\ntensors = "*"\ntype = "q9_9"\n')
    assert_clean_error(run_cli("quantize", "--recipe", r, m), "q9_9")
    assert not list(tmp_path.glob("m.r*.gguf"))


def test_recipe_layer_beyond_model(tmp_path):
    m = write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=4)
    assert_clean_error(run_cli("quantize", "--recipe", "first8_q8", m), "first:8")


def test_recipe_selector_matching_nothing(tmp_path):
    m = write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=4)
    r = _recipe(tmp_path, '[[rules]]\nlayers = "all"\ntensors = "ffn_gate_exps"\ntype = "q8_0"\n')
    assert_clean_error(run_cli("quantize", "--recipe", r, m), "matches no quantizable tensor")


def test_unknown_recipe_param(tmp_path):
    m = write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=4)
    assert_clean_error(run_cli("quantize", "--recipe", "first4_q8", "--set", "nope=q8_0", m), "nope")


def test_missing_build(tmp_path):
    m = write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=4)
    assert_clean_error(run_cli("quantize", "--recipe", "first4_q8", m), "lacq build")
    assert_clean_error(run_cli("ppl", m, "--chunks", "1"), "lacq build")


@pytest.mark.parametrize("args,needle", [
    (["--ctv", "q9_0"], "unknown KV cache type"),
    (["--ctv", "q4_0", "--fa", "off"], "need flash attention"),
    (["--ctk", "turbo3", "--fa", "off"], "turbo3 need flash attention"),
    (["--ctk", "q8_0", "--ctv", "turbo2", "--backend", "metal"], "same type"),
    (["--ctv", "q4_0", "--boundary", "0"], "at least 1"),
    (["--ctv", "q4_0", "--boundary", "3", "--boundary-type", "q7"], "unknown KV cache type"),
    (["--ctv", "q4_0", "--boundary", "5"], "ordinal 4 is out of range: this model has 4 KV layers"),
    (["--kv-policy", "nope"], "unknown KV policy 'nope'"),
    (["--kv-policy", "boundary_v2", "--boundary", "2"], "not both"),
    (["--ctv", "q4_0", "--kv-policy", "layer0_high", "--backend", "cuda"], "lacq build --backend cuda"),
])
def test_bad_kv_settings_fail_before_work(tmp_path, args, needle):
    m = write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=4)
    assert_clean_error(run_cli("ppl", m, *args), needle)


def test_report_on_empty_database():
    assert_clean_error(run_cli("report"), "no perplexity results")


def test_tool_crash_shows_log_tail():
    code = "import os, sys; print('loading model...'); print('fatal: bad tensor', flush=True); os.abort()"
    with pytest.raises(ToolError) as exc:
        run_tool([sys.executable, "-c", code], what="fake-tool")
    text = str(exc.value)
    assert "fake-tool was killed by signal" in text and "fatal: bad tensor" in text


def test_tool_exit_status_reported():
    with pytest.raises(ToolError, match="exited with status 3"):
        run_tool([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], what="fake-tool")


def test_tool_that_prints_nothing_says_so():
    with pytest.raises(ToolError, match="exited with status 2 and printed nothing"):
        run_tool([sys.executable, "-c", "import sys; sys.exit(2)"], what="fake-tool")


@pytest.mark.parametrize("command", ["ppl", "kld"])
def test_context_beyond_training_is_refused_unless_insisted(tmp_path, command):
    m = write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=4, n_ctx=256)
    base = ["--base", m] if command == "kld" else []
    assert_clean_error(run_cli(command, m, *base, "-c", "100000", "--chunks", "1"),
                        "context 100000 is longer than m.gguf was trained for (256 tokens)", "--allow-long-context")
    # insisting gets past the check, to the next one (there is no build here)
    assert_clean_error(run_cli(command, m, *base, "-c", "100000", "--chunks", "1", "--allow-long-context"),
                        "lacq build")


def test_plain_progress_advances_like_rich_progress():
    import io

    from rich.console import Console

    from lacq.cli.common import PlainProgress
    out = io.StringIO()
    p = PlainProgress(Console(file=out, width=200), every=1e9)
    t = p.add_task("sweep", total=2, detail="")
    p.advance(t)
    p.advance(t)
    assert out.getvalue().splitlines()[-1].endswith("sweep: 100%")
