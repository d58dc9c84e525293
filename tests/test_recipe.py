import json
import re
from pathlib import Path

import pytest

from lacq.errors import RecipeError
from lacq.model.info import ModelInfo
from lacq.plan.recipe import (
    compare_with_dry_run,
    list_recipes,
    load_recipe,
    parse_recipe,
    resolve_recipe,
    select_layers,
)

CAPTURES = Path(__file__).parent / "captures"
WEIGHTS = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_gate", "ffn_down"}
ATTN = {"attn_q", "attn_k", "attn_v", "attn_output"}
FFN = {"ffn_up", "ffn_gate", "ffn_down"}
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def smollm2() -> ModelInfo:
    return ModelInfo.from_dict(json.loads((CAPTURES / "smollm2_inspect.json").read_text()))


def quantize_first_match(rules, name):
    """llama-quantize: patterns lowercased, regex_search (unanchored), first match wins."""
    for pattern, qtype in rules:
        if re.search(pattern.lower(), name):
            return pattern
    return None


def dry_run_types(text):
    # "[  3/272] blk.0.attn_k.weight - [...], type = f16, size = ... -> ... MiB (q4_0)"
    line = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*\], type =\s+(\w+), size =.*?(?:\((\w+)\))?$")
    return {m[1]: m[3] or m[2] for m in map(line.match, text.splitlines()) if m}


# recipe -> (upgraded blocks, upgraded groups) on the 30-block SmolLM2
STUDY = {
    "uniform_q4_0": (set(), set()),
    "first4_q8": (set(range(4)), WEIGHTS),
    "first8_q8": (set(range(8)), WEIGHTS),
    "last4_q8": (set(range(26, 30)), WEIGHTS),
    "last8_q8": (set(range(22, 30)), WEIGHTS),
    "middle8_q8": (set(range(11, 19)), WEIGHTS),
    "first_last4_q8": (set(range(4)) | set(range(26, 30)), WEIGHTS),
    "alternating_even_q8": (set(range(0, 30, 2)), WEIGHTS),
    "attention_q8": (set(range(30)), ATTN),
    "ffn_q8": (set(range(30)), FFN),
}


def test_ten_recipes_ship():
    assert set(STUDY) <= set(list_recipes())
    for name in STUDY:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.description and "\n" not in recipe.description


@pytest.mark.parametrize("name", sorted(STUDY))
def test_study_recipe_rules(smollm2, name):
    blocks, groups = STUDY[name]
    plan = resolve_recipe(load_recipe(name), smollm2)
    expected = {t.name for t in smollm2.tensors if t.block in blocks and t.group in groups}
    assert plan.base_ftype == "Q4_0"
    assert {qtype for _, qtype in plan.rules} <= {"q8_0"}
    # every pattern names exactly one tensor under llama-quantize's matching, and no other tensor
    hits = {}
    for t in smollm2.tensors:
        if (pattern := quantize_first_match(plan.rules, t.name)) is not None:
            hits.setdefault(pattern, []).append(t.name)
    assert all(len(names) == 1 for names in hits.values())
    assert len(hits) == len(plan.rules)
    assert {names[0] for names in hits.values()} == expected
    for t in smollm2.tensors:
        if t.name in expected:
            assert plan.tensor_types[t.name] == "q8_0"
        elif t.group in WEIGHTS:
            assert plan.tensor_types[t.name] == "q4_0"
    assert plan.tensor_types["token_embd.weight"] == "q8_0"  # tied output: q6_k, 576 cols -> q8_0
    assert plan.tensor_types["blk.0.attn_norm.weight"] == "f32"


def test_patterns_are_anchored_and_lowercase_safe(smollm2):
    text = resolve_recipe(load_recipe("first8_q8"), smollm2).tensor_type_file_text()
    lines = text.split()
    assert lines[0] == r"^blk\.0\.attn_k\.weight$=q8_0"
    assert len(lines) == 56 and not re.search(r"\\[A-Z]", text) and "#" not in text
    assert quantize_first_match([l.split("=") for l in lines], "blk.17.attn_q.weight") is None


def test_prediction_matches_captured_dry_run(smollm2):
    # the capture: F16 SmolLM2, Q4_0, --tensor-type blk.0.attn_q=q8_0 --tensor-type blk.1.ffn_down=q8_0
    recipe = parse_recipe({
        "name": "capture", "description": "d", "base": "q4_0",
        "rules": [{"layers": "0", "tensors": "attn_q", "type": "q8_0"},
                  {"layers": "1", "tensors": "ffn_down", "type": "Q8_0"}],
    })
    plan = resolve_recipe(recipe, smollm2)
    actual = dry_run_types((CAPTURES / "quantize_dryrun_q4_0.log").read_text())
    assert len(actual) == 272
    assert compare_with_dry_run(plan, actual) == []
    assert round(plan.predicted_bytes / MIB, 2) == 86.35  # "quant size = 86.35 MiB (5.39 BPW)"


def test_predicted_sizes(smollm2):
    uniform = resolve_recipe(load_recipe("uniform_q4_0"), smollm2)
    first8 = resolve_recipe(load_recipe("first8_q8"), smollm2)
    # checked against llama-quantize --dry-run on the F16 model
    assert round(uniform.predicted_bytes / MIB, 2) == 85.77
    assert round(first8.predicted_bytes / MIB, 2) == 99.27
    # q8_0 costs 34 bytes per 32 weights, q4_0 18: 16 extra per block of 32 over blocks 0-7
    n_upgraded = sum(t.n_elements for t in smollm2.tensors if t.block is not None and t.block < 8 and t.group in WEIGHTS)
    assert first8.predicted_bytes - uniform.predicted_bytes == n_upgraded // 32 * 16
    assert first8.predicted_bpw > uniform.predicted_bpw


def test_overrides(smollm2):
    plan = resolve_recipe(load_recipe("first8_q8"), smollm2, {"base": "q4_k", "high": "Q6_K"})
    assert plan.base_ftype == "Q4_K_M" and plan.params == {"base": "q4_k", "high": "q6_k"}
    assert {qtype for _, qtype in plan.rules} == {"q6_k"}
    assert plan.tensor_types["blk.0.ffn_down.weight"] == "q6_k"
    assert plan.tensor_types["blk.0.attn_q.weight"] == "q8_0"  # 576 columns: q6_k falls back
    assert plan.tensor_types["blk.9.attn_q.weight"] == "q5_0"  # q4_k falls back too
    assert plan.tensor_types["blk.9.ffn_down.weight"] == "q6_k"  # Q4_K_M's use_more_bits
    default = resolve_recipe(load_recipe("first8_q8"), smollm2)
    assert plan.plan_hash != default.plan_hash
    assert default.plan_hash == resolve_recipe(load_recipe("first8_q8"), smollm2).plan_hash


@pytest.mark.parametrize("selector,expected", [
    ("all", list(range(30))),
    ("first:8", list(range(8))),
    ("last:4", list(range(26, 30))),
    ("middle:8", list(range(11, 19))),
    ("first:10%", [0, 1, 2]),
    ("last:25%", list(range(22, 30))),  # 7.5 rounds half up to 8
    ("first:1%", [0]),  # at least one block
    ("boundary:2", [0, 1, 28, 29]),
    ("even", list(range(0, 30, 2))),
    ("odd", list(range(1, 30, 2))),
    ("0,3,5-7", [0, 3, 5, 6, 7]),
])
def test_layer_selectors(selector, expected):
    assert select_layers(selector, 30) == expected


def test_middle_on_study_model():
    assert select_layers("middle:8", 24) == list(range(8, 16))


def _recipe(rules, params=None, base="{base}"):
    return parse_recipe({"name": "t", "description": "d", "base": base,
                         "params": params or {"base": "q4_0", "high": "q8_0"}, "rules": rules})


@pytest.mark.parametrize("rules,overrides,message", [
    ([{"layers": "all", "tensors": "*", "type": "q9_9"}], None, "unknown type 'q9_9'; valid types: .*q4_0"),
    ([{"layers": "all", "tensors": "*", "type": "{high}"}], {"high": "q7_0"}, "unknown type 'q7_0'"),
    ([{"layers": "0,40", "tensors": "*", "type": "q8_0"}], None, "layer 40 is beyond the model"),
    ([{"layers": "first:31", "tensors": "*", "type": "q8_0"}], None, "asks for 31 blocks; the model has 30"),
    ([{"layers": "sideways", "tensors": "*", "type": "q8_0"}], None, "unknown layer selector"),
    ([{"layers": "all", "tensors": "attn_norm", "type": "q8_0"}], None, "rule 1 .* matches no quantizable tensor"),
    ([{"layers": "all", "tensors": "*", "type": "q8_0"},
      {"layers": "first:2", "tensors": "token_embd", "type": "q8_0"}], None, "rule 2 .* matches no quantizable tensor"),
    ([], {"hihg": "q8_0"}, "no parameter 'hihg'; parameters: base, high"),
    ([], {"base": "q3_xx"}, "base type 'q3_xx' not supported"),
    ([{"layers": "all", "tensors": "*", "type": "q8_0"}], {"base": "f16"}, "no effect with an unquantized base"),
])
def test_resolution_errors(smollm2, rules, overrides, message):
    with pytest.raises(RecipeError, match=message):
        resolve_recipe(_recipe(rules), smollm2, overrides)


def test_non_block_rules(smollm2):
    plan = resolve_recipe(_recipe([{"tensors": "token_embd", "type": "q6_k"}, {"tensors": "attn_v", "type": "q5_0"}]), smollm2)
    assert plan.rules[0] == (r"^token_embd\.weight$", "q6_k")
    assert plan.tensor_types["token_embd.weight"] == "q8_0"  # 576 columns: q6_k falls back
    assert plan.tensor_types["blk.29.attn_v.weight"] == "q5_0"
    assert len(plan.rules) == 31
    glob = resolve_recipe(_recipe([{"layers": "last:1", "tensors": "ffn_*", "type": "q8_0"}]), smollm2)
    assert [p for p, _ in glob.rules] == [rf"^blk\.29\.{g}\.weight$" for g in ("ffn_down", "ffn_gate", "ffn_up")]


def test_first_rule_wins(smollm2):
    plan = resolve_recipe(_recipe([{"layers": "0", "tensors": "attn_q", "type": "q5_0"},
                                   {"layers": "first:2", "tensors": "attn", "type": "q8_0"}]), smollm2)
    types = dict(plan.rules)
    assert types[r"^blk\.0\.attn_q\.weight$"] == "q5_0" and types[r"^blk\.1\.attn_q\.weight$"] == "q8_0"


@pytest.mark.parametrize("text,message", [
    ("name = 'x'\ndescription = 'd'\nbase = [", "not valid TOML"),
    ("description = 'd'\nbase = 'q4_0'\n", "'name' is required"),
    ("name = 'x'\ndescription = 'd'\nbase = 'q4_0'\ncolour = 'red'\n", "unknown key.*colour"),
    ("name = 'x'\ndescription = 'd'\nbase = 'q4_0'\n[[rules]]\ntensors = '*'\ntype = 'q8_0'\nlayer = 'all'\n",
     "rule 1: unknown key.*layer"),
    ("name = 'x'\ndescription = 'd'\nbase = 'q4_0'\n[[rules]]\nlayers = 'all'\ntensors = '*'\n", "rule 1: 'type' is required"),
    ("name = 'x'\ndescription = 'd'\nbase = '{bse}'\n[params]\nbase = 'q4_0'\n", "'{bse}' refers to no parameter"),
])
def test_malformed_files(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(path)
    assert str(path) in str(err.value)


def test_unknown_recipe_name():
    with pytest.raises(RecipeError, match="unknown recipe 'nope'; available: .*first8_q8"):
        load_recipe("nope")
