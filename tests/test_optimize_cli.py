"""`lacq optimize` on scans built here: budgets in bits per weight, one-ended scans, incomplete scans, type lists."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lacq.cli import cli
from lacq.studies.artifact import Scan
from lacq.studies.optimize import budget_limits, optimize
from tests.test_optimize import TINY, additive_scan

# four block tensors of 3200 weights (q4_0 1800 bytes, q5_0 2200, q8_0 3400), 400 f32 norm weights (1600 bytes)
# outside every unit, and a file header of 50 kB (metadata, tokenizer): whole-file bytes are not tensor bytes
N_UNIT, NORM_BYTES, HEADER = 3200, 1600, 50_000
UNITS = {f"blk.{i}.attn_v": {"q4_0": 1800, "q5_0": 2200, "q8_0": 3400} for i in range(4)}
N_ELEMENTS = 4 * N_UNIT + 400


def bpw_scan(**model) -> Scan:
    s = additive_scan({u: 0.01 * (i + 1) for i, u in enumerate(UNITS)}, UNITS, fixed=NORM_BYTES + HEADER)
    return Scan(**{**s.__dict__, "model": {**s.model, **model}})


def run(*args: str):
    return CliRunner().invoke(cli, ["optimize", *args])


def one_line_failure(r, needle: str) -> None:
    assert r.exit_code == 1, r.output
    assert needle in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_bpw_is_tensor_bits_per_weight_as_llama_cpp_counts_them():
    from lacq.studies.optimize import bits_per_weight, bpw_budget
    scan = bpw_scan(n_elements=N_ELEMENTS, overhead_bytes=HEADER)
    lo, hi = budget_limits(scan)
    # uniform q4_0: (4 × 1800 + 1600) × 8 / 13200 tensor bits per weight, as `lacq inspect` would say
    assert bits_per_weight(scan, lo) == pytest.approx((4 * 1800 + NORM_BYTES) * 8 / N_ELEMENTS)
    assert bpw_budget(scan, bits_per_weight(scan, hi)) == pytest.approx(hi)
    s = optimize(scan, bpw_budget(scan, 6.0))
    assert s.bpw <= 6.0 and s.bpw == pytest.approx((s.cost - HEADER) * 8 / N_ELEMENTS)


def test_optimize_takes_a_bpw_budget_just_above_uniform_q4_0(tmp_path):
    scan = bpw_scan(n_elements=N_ELEMENTS, overhead_bytes=HEADER)
    path = scan.write(tmp_path / "scan.json")
    q4 = (4 * 1800 + NORM_BYTES) * 8 / N_ELEMENTS  # 5.33
    r = run("weights", str(path), "--bpw", f"{q4 + 0.05:.2f}", "-o", str(tmp_path / "opt.toml"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "opt.toml").exists() and "bpw)" in r.output
    r = run("weights", str(path), "--bpw", f"{q4 - 0.05:.2f}", "-o", str(tmp_path / "low.toml"))
    one_line_failure(r, "below the smallest possible")
    assert f"{q4:.4f} bpw" in r.output and not (tmp_path / "low.toml").exists()


@pytest.mark.parametrize("model, needle", [({}, "no n_elements"), ({"n_elements": N_ELEMENTS}, "no overhead_bytes")])
def test_bpw_on_a_scan_that_cannot_price_it_fails_in_one_line(tmp_path, model, needle):
    path = bpw_scan(**model).write(tmp_path / "scan.json")
    one_line_failure(run("weights", str(path), "--bpw", "6", "-o", str(tmp_path / "x.toml")), needle)
    assert not (tmp_path / "x.toml").exists()


def test_a_scan_with_only_its_lowest_end_usable_is_optimized(tmp_path):
    scan = additive_scan({"a": 0.03, "b": 0.01}, {u: {"q4_0": 900, "q5_0": 1100, "q8_0": 1700} for u in "ab"},
                         lower=False)
    path = scan.write(tmp_path / "scan.json")
    lo, hi = budget_limits(scan)
    r = run("weights", str(path), "--size-mb", f"{(lo + hi) / 2e6:.6f}", "-o", str(tmp_path / "opt.toml"))
    assert r.exit_code == 0, r.output
    assert "from the q4_0 end" in r.output and "None" not in r.output and (tmp_path / "opt.toml").exists()


@pytest.mark.parametrize("drop, needle", [
    (lambda d: d.pop("fixed_cost"), "no 'fixed_cost' field"),
    (lambda d: d["units"][0].pop("cost"), "no 'cost' field"),
    (lambda d: d["uniform"]["q4_0"].pop("kld"), "not a well-formed lacq scan"),
])
def test_a_scan_missing_a_field_fails_in_one_line(tmp_path, drop, needle):
    d = json.loads(TINY.to_json())
    drop(d)
    (tmp_path / "scan.json").write_text(json.dumps(d))
    one_line_failure(run("weights", str(tmp_path / "scan.json"), "--size-mb", "0.01"), needle)


def test_types_take_spaces_after_commas(tmp_path):
    path = TINY.write(tmp_path / "scan.json")
    hi = budget_limits(TINY, types=["q4_0", "q8_0"])[1]
    r = run("weights", str(path), "--size-mb", f"{hi / 1e6:.6f}", "--types", "q4_0, q8_0", "-o",
            str(tmp_path / "opt.toml"))
    assert r.exit_code == 0, r.output
    text = (tmp_path / "opt.toml").read_text()
    assert 'type = "q8_0"' in text and "q5_0" not in text.split("[params]")[1]
