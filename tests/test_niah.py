"""Needle-in-a-haystack: prompt building, scoring, bad input; e2e both runners agree."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lacq import paths
from lacq.cli import cli
from lacq.llama.tools import completion
from lacq.measure.niah import grid, prompts, runners
from lacq.plan.kv.config import KvConfig

CORPUS = " ".join(f"Sentence {i} talks about the history of the river valley and its towns." for i in range(4000))


def word_count(text: str) -> int:
    """A stand-in tokenizer for unit tests: one token per whitespace-separated word."""
    return len(text.split())


def plain_builder(**kw) -> prompts.PromptBuilder:
    return prompts.PromptBuilder(CORPUS, prompts.ChatTemplate("none", None), word_count, **kw)


# ---------------------------------------------------------------- scoring
@pytest.mark.parametrize("answer,key,passed", [
    (" 9150.", "9150", True),
    (" 9150", "9150", True),
    (" is 9150, remember", "9150", True),
    (" 1234. Or 9150.", "9150", False),  # the first number counts
    (" 91500", "9150", False),
    (" nine one five zero", "9150", False),
    ("", "9150", False),
])
def test_score_is_exact_first_number(answer, key, passed):
    assert prompts.score(key, answer) is passed


# ---------------------------------------------------------------- prompts
def test_prompt_fills_the_budget_and_hides_the_needle_at_depth():
    b = plain_builder(seed=3, n_predict=16)
    for depth in (0, 50, 100):
        p = b.prompt(1024, depth, 0)
        assert b.budget(1024) - 20 <= p.n_tokens <= b.budget(1024)
        needle = prompts.NEEDLE.format(key=p.key)
        assert p.text.count(needle) == 1 and p.text.endswith(prompts.ANSWER_PREFIX)
        body = p.text.split("\n\n")[1]
        frac = body.index(needle) / len(body)
        assert abs(frac - depth / 100) < 0.1, (depth, frac)


def test_prompts_are_seeded_per_trial_and_shared_across_depths():
    a, b = plain_builder(seed=1), plain_builder(seed=1)
    assert a.prompt(512, 50, 0) == b.prompt(512, 50, 0)
    assert a.prompt(512, 0, 0).key == a.prompt(512, 100, 0).key
    keys = {a.prompt(512, 50, t).key for t in range(6)}
    assert len(keys) > 1
    assert plain_builder(seed=2).prompt(512, 50, 0).text != a.prompt(512, 50, 0).text


def test_key_never_appears_in_the_haystack():
    corpus = " ".join(str(n) for n in range(1000, 10000))  # every 4-digit key is in the text
    b = prompts.PromptBuilder(corpus * 3, prompts.ChatTemplate("none", None), word_count)
    # the slice is short enough that some key is missing from it
    p = b.prompt(256, 50, 0)
    assert p.text.count(p.key) == 2  # the needle says it twice, the haystack never


def test_chat_template_renders_and_prefills_the_answer():
    t = prompts.ChatTemplate("chatml", prompts.CHATML)
    text = t.render("hello")
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n" + prompts.ANSWER_PREFIX


# ---------------------------------------------------------------- bad input
def test_context_longer_than_the_model_supports():
    with pytest.raises(prompts.NiahError, match="longer than the model supports"):
        grid.check_lengths([1024, 16384], 8192)
    with pytest.raises(prompts.NiahError, match="too short"):
        grid.check_lengths([64], 8192)
    with pytest.raises(prompts.NiahError, match="percentage"):
        grid.check_depths([0, 120])


def test_needle_that_does_not_fit():
    b = plain_builder(n_predict=48)  # template, needle and question take about 40 "tokens" here
    with pytest.raises(prompts.NiahError, match="cannot hold the needle: .* leaving"):
        b.check_fits(128)
    b.check_fits(512)


def test_haystack_too_short():
    b = prompts.PromptBuilder("just a few words " * 50, prompts.ChatTemplate("none", None), word_count)
    with pytest.raises(prompts.NiahError, match="longer --haystack"):
        b.prompt(4096, 50, 0)


def test_unknown_chat_template(tmp_path, monkeypatch):
    monkeypatch.setattr(prompts, "chat_metadata", lambda m: ("{{ messages[0].content }}", "", ""))
    with pytest.raises(prompts.NiahError, match="unknown chat template 'llama9'"):
        prompts.resolve_template("llama9", tmp_path / "m.gguf")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{{ raise_exception('this template needs a system message') }}")
    with pytest.raises(prompts.NiahError, match="does not render .*needs a system message"):
        prompts.resolve_template(str(broken), tmp_path / "m.gguf")
    assert prompts.resolve_template("auto", tmp_path / "m.gguf").name == "model"
    monkeypatch.setattr(prompts, "chat_metadata", lambda m: (None, "", ""))
    assert prompts.resolve_template("auto", tmp_path / "m.gguf").source is None


def test_bindings_version_and_library_checks(tmp_path):
    runners.check_bindings_version(runners.BINDINGS_VERSION)
    with pytest.raises(prompts.NiahError, match="0.3.2 does not match"):
        runners.check_bindings_version("0.3.2")
    lib = tmp_path / "bin" / "libllama.so"
    runners.check_loaded_library(str(lib), tmp_path / "bin")
    with pytest.raises(prompts.NiahError, match="not the build's"):
        runners.check_loaded_library("/usr/lib/libllama.so", tmp_path / "bin")


def test_bindings_that_cannot_bind_the_library_fail_cleanly(tmp_path):
    code = ("from lacq.measure.niah import runners as niah\n"
            "try:\n    niah.load_bindings(__import__('pathlib').Path(%r))\n"
            "except niah.NiahError as e:\n    print('NIAHERROR', e)\n") % str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "NIAHERROR" in out.stdout, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_completion_output_parsing(capture):
    out = capture("niah_completion_q8_0_q4_0_b2.stdout.log")
    err = capture("niah_completion_q8_0_q4_0_b2.stderr.log")
    text, n = completion.parse(out, err)
    assert text == " 5996." and n == 235
    assert completion.parse(" 12 34\n\n", "")[0] == " 12 34"  # stopped at -n, no end-of-text marker


def test_completion_argv_passes_prompt_bytes_and_greedy():
    args = completion.argv("llama-completion", "m.gguf", "p.txt", n_ctx=1024, n_predict=16, threads=2,
                           ngl=99, kv_args=["-ctk", "q8_0", "-ctv", "q4_0", "-fa", "on"])
    assert args[args.index("-bf") + 1] == "p.txt" and "-no-cnv" in args
    assert args[args.index("--temp") + 1] == "0" and args[args.index("-fa") + 1] == "on"
    assert args[args.index("-ctv") + 1] == "q4_0" and args[args.index("-ngl") + 1] == "99"


def test_pass_rates():
    t = lambda l, d, ok: grid.NiahTrial(l, d, 0, "1", "", ok, 10, 0.1)
    rates = grid.pass_rates([t(512, 0, True), t(512, 0, False), t(512, 100, True)])
    assert rates == {(512, 0): (1, 2), (512, 100): (1, 1)}


def test_cli_refuses_bad_ctx_before_work(monkeypatch, tmp_path):
    from synth import write_synthetic_gguf
    model = write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=2)
    r = CliRunner().invoke(cli, ["niah", str(model), "--ctx", "1024,x"])
    assert r.exit_code != 0 and "comma-separated integers" in r.output


# ---------------------------------------------------------------- e2e
def _need_bindings():
    import importlib.metadata
    try:
        importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llama-cpp-python is not installed (pip install -e .[niah])")


@pytest.mark.e2e
def test_bindings_and_completion_give_the_same_answers(cpu_build, smollm2):
    """The same prompt text through llama-cpp-python and llama-completion: same tokens, same answers."""
    _need_bindings()
    from lacq import paths
    kv = KvConfig("q8_0", "q4_0", "on")
    bind = runners.BindingsRunner(cpu_build, smollm2, kv, threads=1)
    comp = runners.CompletionRunner(cpu_build, smollm2, kv, threads=1)
    template = prompts.resolve_template("auto", smollm2)
    builder = prompts.PromptBuilder(paths.default_corpus().read_text(errors="replace"), template, bind.count_tokens,
                                 seed=7, n_predict=8)
    try:
        for length, depth in ((512, 0), (1024, 100)):
            p = builder.prompt(length, depth, 0)
            assert p.text.startswith("<|im_start|>system")  # SmolLM2's own template
            a, b = bind.generate(p, 8), comp.generate(p, 8)
            assert a.n_prompt_tokens == b.n_prompt_tokens == p.n_tokens
            assert a.text.strip() == b.text.strip(), (a.text, b.text)
            assert prompts.first_number(a.text) is not None  # it answered with a number, not nothing
    finally:
        bind.close()
    assert comp.count_tokens(p.text) == p.n_tokens


@pytest.mark.e2e
def test_niah_cli_stores_a_grid(cpu_build, smollm2, tmp_path):
    _need_bindings()
    from lacq.results.store import open_store
    png = tmp_path / "grid.png"
    r = CliRunner().invoke(cli, ["niah", str(smollm2), "--ctx", "256", "--depths", "0,100", "--trials", "1",
                                 "-t", "1", "--ctk", "q8_0", "--ctv", "q4_0", "--boundary", "2", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    (res,) = open_store().results(kind="niah")
    assert res.kv["v_overrides"] == ["0..1=q8_0", "-2..-1=q8_0"] and res.kv["flash_attn"] == "on"
    assert [(c["length"], c["depth"], c["n"]) for c in res.metrics["grid"]] == [(256, 0, 1), (256, 100, 1)]
    assert png.stat().st_size > 1000


@pytest.mark.e2e
def test_niah_cli_refuses_too_long_a_context(cpu_build, smollm2):
    r = CliRunner().invoke(cli, ["niah", str(smollm2), "--ctx", "16384"])
    assert r.exit_code != 0 and "longer than the model supports (8192" in r.output and "Traceback" not in r.output


def test_grid_and_summary_frames():
    from types import SimpleNamespace

    from lacq.results.tables import niah_grid_frame, niah_summary_frame
    metrics = {"trials": 2, "pass_rate": 0.75, "grid": [
        {"length": 1024, "depth": 0, "passed": 2, "n": 2}, {"length": 1024, "depth": 100, "passed": 2, "n": 2},
        {"length": 2048, "depth": 0, "passed": 1, "n": 2}, {"length": 2048, "depth": 100, "passed": 1, "n": 2}]}
    df = niah_grid_frame(metrics)
    assert list(df.index) == [0, 100] and list(df.columns) == [1024, 2048]
    assert df.loc[0, 2048] == 0.5 and df.loc[100, 1024] == 1.0
    s = niah_summary_frame([SimpleNamespace(kind="niah", label="f16/f16", metrics=metrics)])
    assert s.loc[0, "niah_by_length"] == "1024:100% 2048:50%" and s.loc[0, "niah_pass_pct"] == 75


@pytest.mark.e2e
def test_an_interrupted_grid_resumes_where_it_stopped(cpu_build, smollm2, tmp_path, monkeypatch):
    """Ctrl-C after the first probe keeps it; the same call finishes the grid without redoing it."""
    _need_bindings()
    from lacq.measure.niah.grid import measure_niah
    from lacq.model.info import inspect_model
    from lacq.results.store import open_store
    store, info, kv = open_store(), inspect_model(smollm2), KvConfig("q8_0", "q4_0", "on")
    monkeypatch.setenv("LACQ_HOME", str(tmp_path / "home"))  # the journal's home: this test's own
    kwargs = dict(lengths=[256], depths=[0, 100], trials=1, runner="bindings", threads=1)

    def stop_after_first(frac, detail):
        if frac >= 0.5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        measure_niah(cpu_build, store, smollm2, info, kv, progress=stop_after_first, **kwargs)
    assert store.results(kind="niah") == []  # nothing stored for a grid that did not finish
    (journal,) = (paths.home() / "work" / "niah").glob("*.jsonl")
    (first,) = [grid.NiahTrial(**json.loads(line)) for line in journal.read_text().splitlines()]
    assert (first.length, first.depth, first.trial) == (256, 0, 0)

    seen = []
    out = measure_niah(cpu_build, store, smollm2, info, kv, progress=lambda f, d: seen.append(d), **kwargs)
    assert seen[0] == "resuming, 1 probes done before"
    assert out.trials[0] == first  # read back, not run again (its timing would differ)
    assert out.trials[1].depth == 100 and out.trials[1].seconds > 0
    assert not journal.exists()  # a finished grid leaves no journal
    again = measure_niah(cpu_build, store, smollm2, info, kv, **kwargs)
    assert [(t.key, t.answer) for t in again.trials] == [(t.key, t.answer) for t in out.trials]


def test_journal_keeps_whole_lines_only(tmp_path):
    t = grid.NiahTrial(1024, 50, 2, "4821", " 4821.", True, 1010, 0.5)
    j = grid.Journal(tmp_path / "j" / "grid.jsonl")
    assert j.get(1024, 50, 2) is None
    j.add(t)
    with open(j.path, "a") as f:
        f.write('{"length": 1024, "depth": 75, "tri')  # killed mid-write
    again = grid.Journal(j.path)
    assert again.get(1024, 50, 2) == t and len(again.done) == 1
    later = grid.NiahTrial(1024, 75, 2, "0917", " 917", False, 1012, 0.5)
    again.add(later)  # lands on a line of its own: the cut line was dropped on reading
    assert grid.Journal(j.path).done == {(1024, 50, 2): t, (1024, 75, 2): later}
    again.remove()
    assert not j.path.exists()


def test_a_cut_line_is_repaired_in_a_new_file(tmp_path):
    j = grid.Journal(tmp_path / "grid.jsonl")
    j.add(grid.NiahTrial(1024, 50, 2, "4821", " 4821.", True, 1010, 0.5))
    with open(j.path, "a") as f:
        f.write('{"length": 1024, "dep')
    before = j.path.stat().st_ino
    with open(j.path) as reader:  # another process reading the journal as it is repaired
        assert len(grid.Journal(j.path).done) == 1
        assert reader.read().endswith('"dep')  # it still sees the file it opened, not one being rewritten
    assert j.path.stat().st_ino != before  # replaced by a rename, not rewritten in place
    assert j.path.read_text().count("\n") == 1 and not list(tmp_path.glob(".*part"))


def test_each_grid_has_a_journal_of_its_own(tmp_path):
    """A sweep runs a grid per context length side by side: one grid's journal must not be another's."""
    from lacq.llama.build import Build
    from lacq.results.store import open_store
    model, haystack = tmp_path / "m.gguf", tmp_path / "hay.txt"
    model.write_bytes(b"GGUF" + bytes(60))
    haystack.write_text(CORPUS)
    build = Build(key="k0", bin_dir=tmp_path, source_hash="s", source_origin="o", series_hash="h", patches=(),
                  backend="cpu")
    grid_args = dict(model=model, build=build, kv=KvConfig(), runner="completion", ngl=None, haystack=haystack,
                     template=prompts.ChatTemplate("none", None), seed=0, n_predict=16, lengths=[1024],
                     depths=[0, 50, 100], trials=2)
    store = open_store()
    path = grid.journal_path(store, **grid_args)
    assert grid.journal_path(store, **grid_args) == path  # the same grid resumes from its journal
    other_build = Build(**{**build.__dict__, "key": "k1"})
    for change in (dict(lengths=[2048]), dict(lengths=[1024, 2048]), dict(depths=[50]), dict(trials=3),
                   dict(kv=KvConfig("q8_0", "q4_0", "on")), dict(build=other_build), dict(seed=1)):
        assert grid.journal_path(store, **{**grid_args, **change}) != path, change


@pytest.mark.e2e
def test_a_grid_of_another_length_leaves_an_interrupted_grids_journal(cpu_build, smollm2, tmp_path, monkeypatch):
    """As `lacq sweep --jobs 2` runs them: the first grid to finish used to delete the journal both shared."""
    from lacq.measure.niah.grid import measure_niah
    from lacq.model.info import inspect_model
    from lacq.results.store import open_store
    store, info, kv = open_store(), inspect_model(smollm2), KvConfig()
    monkeypatch.setenv("LACQ_HOME", str(tmp_path / "home"))  # the journals' home: this test's own
    common = dict(depths=[0, 100], trials=1, runner="completion", threads=1)

    def stop_after_first(frac, detail):
        if frac >= 0.5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        measure_niah(cpu_build, store, smollm2, info, kv, lengths=[256], progress=stop_after_first, **common)
    (journal,) = (paths.home() / "work" / "niah").glob("*.jsonl")
    measure_niah(cpu_build, store, smollm2, info, kv, lengths=[384], **common)  # another grid, to the end
    assert journal.exists() and len(journal.read_text().splitlines()) == 1
    seen = []
    measure_niah(cpu_build, store, smollm2, info, kv, lengths=[256], progress=lambda f, d: seen.append(d), **common)
    assert seen[0] == "resuming, 1 probes done before"
    assert not list((paths.home() / "work" / "niah").glob("*.jsonl"))


@pytest.mark.e2e
def test_niah_cli_refuses_a_model_without_tokenizer(cpu_build, tmp_path):
    from synth import write_synthetic_gguf
    model = write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=2)
    for runner in ("bindings", "completion"):
        r = CliRunner().invoke(cli, ["niah", str(model), "--ctx", "256", "--runner", runner])
        assert r.exit_code == 1, r.output
        assert "m.gguf has no tokenizer" in r.output and "Traceback" not in r.output
