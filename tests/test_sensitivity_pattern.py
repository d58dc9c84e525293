"""The damage pattern of a scan (studies/sensitivity.classify) on synthetic KV scans whose recoveries and
damages are chosen, and on the committed real scan of Qwen2.5-Coder-1.5B's K cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from lacq.studies.artifact import Kld, Scan, Unit
from lacq.studies.sensitivity import classify

REPO = Path(__file__).resolve().parent.parent
LO, HI = 5.70, 0.005  # K q4_0 vs q8_0 KLD, as on Qwen2.5-Coder-1.5B


def kv_scan(raised: list[float], lowered: list[float], lo: float = LO, hi: float = HI) -> Scan:
    """KV layer i: KLD `raised[i]` with only it at q8_0 (the rest q4_0), `lowered[i]` with only it at q4_0."""
    units = tuple(Unit(f"kv.{i}", "kv_layer", (), {"q4_0": 4.5, "q8_0": 8.5}, raise_={"q8_0": Kld(r, 1e-3)},
                       lower={"q4_0": Kld(d, 1e-3)}, block=i, ordinal=i)
                  for i, (r, d) in enumerate(zip(raised, lowered)))
    return Scan(kind="kv", model={"path": "m.gguf", "sha256": "0" * 64}, base={"cache": "k"}, types=("q4_0", "q8_0"),
                units=units, uniform={"q4_0": Kld(lo, 1e-2), "q8_0": Kld(hi, 1e-4)}, fixed_cost=0, chunks=2,
                ctx=512, cost_unit="bit-values", total_values=float(len(units)))


def pattern(scan: Scan) -> tuple[str, str]:
    return classify(scan, ("kv_layer",))


def test_one_layer_that_alone_destroys_and_alone_recovers_is_a_single_bottleneck():
    # layer 0 at q8_0 under q4_0: 0.036 (99% of the gap recovered); layer 0 alone at q4_0: 5.718
    scan = kv_scan([0.036] + [5.70] * 7, [5.718] + [0.012] * 7)
    name, advice = pattern(scan)
    assert name == "single bottleneck"
    assert advice.startswith("kv.0 carries 99% of the damage and raising it alone recovers 99% of the gap")
    assert "protect it at q8_0 and keep the rest at q4_0" in advice


def test_two_layers_that_each_destroy_the_model_are_not_a_single_bottleneck():
    # each carries half the damage (once enough for "single bottleneck"), but raising either alone recovers
    # nothing: protecting one unit is not the answer
    scan = kv_scan([5.70, 5.69] + [5.70] * 6, [5.70, 5.70] + [0.005] * 6)
    name, advice = pattern(scan)
    assert name == "a few hot units + distributed"
    assert advice.split(" carry ")[0].split(", ")[:2] in (["kv.0", "kv.1"], ["kv.1", "kv.0"])


def test_most_damage_in_one_layer_that_recovers_little_alone_is_not_a_single_bottleneck():
    scan = kv_scan([4.0] + [5.70] * 7, [3.0] + [0.05] * 7)  # 90% of the damage, 30% of the gap recovered
    assert pattern(scan)[0] == "a few hot units + distributed"


def test_a_second_layer_recovering_much_alone_is_not_a_single_bottleneck():
    scan = kv_scan([1.0, 4.5] + [5.70] * 6, [5.0, 0.5] + [0.01] * 6)  # kv.1 recovers 21% of the gap alone
    assert pattern(scan)[0] == "a few hot units + distributed"


@pytest.mark.parametrize("lo, raised, lowered, expected", [
    (0.004, [0.003] * 8, [0.002] * 8, "insensitive"),
    (0.40, [0.35] * 8, [0.05] * 8, "distributed"),
])
def test_other_patterns_are_unchanged(lo, raised, lowered, expected):
    assert pattern(kv_scan(raised, lowered, lo=lo, hi=0.001))[0] == expected


# The real scan: `lacq scan kv qwen2.5-coder-1.5b --cache k --types q4_0,q8_0 --other f16 --chunks 1 -t 2`
# on 2 CPU cores (bench/results/qwen_kv_cpu.md; about half an hour, too slow for CI).
QWEN_SCAN = REPO / "bench" / "results" / "kv-cpu" / "scan_kv_qwen25_coder_k.json"


def test_qwen25_coder_k_cache_scan_finds_the_layer_0_bottleneck():
    scan = Scan.read(QWEN_SCAN)
    assert scan.model["architecture"] == "qwen2" and scan.model["n_kv_layers"] == 28
    assert scan.uniform["q4_0"].kld > 1.0 and scan.uniform["q8_0"].kld < 0.01  # K q4_0 destroys the model
    name, advice = pattern(scan)
    assert name == "single bottleneck"
    assert advice.startswith("kv.0 carries ")


def test_qwen25_coder_optimizer_protects_layer_0_first():
    from lacq.studies.optimize import curve
    scan = Scan.read(QWEN_SCAN)
    one_layer = (8.5 - 4.5) / 28  # bits/value one KV layer's K at q8_0 adds over q4_0
    sols = curve(scan, [4.5 + one_layer + 1e-6, 4.5 + 2 * one_layer + 1e-6])
    assert [u for u, t in sols[0].choice.items() if t == "q8_0"] == ["kv.0"]
    assert sols[0].kld < scan.uniform["q4_0"].kld / 20
    assert "kv.0" in [u for u, t in sols[1].choice.items() if t == "q8_0"]
