"""Comparing parity documents (`lacq compare`): one row per configuration, one column group per
document, differences against the first, and the verdicts that decide the exit status.

Pure over the documents: loading a file or a stored study gives a dict; `compare` returns the
table rows and the list of disagreements; the CLI prints them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lacq.errors import LacqError
from lacq.results.store import Store, latest_by_label
from lacq.studies.parity import SUITE

STUDY_SUITE = "lacq-study"  # a document made from a stored study's KLD/PPL rows
# Only the turbo cases gate: backends differ in which stock types they support (CUDA skips q2_0
# flash attention, Metal others), so whole-op counts differ between any two of them by design and
# are shown, not gated; the turbo cases are the ones lacq's patches promise on every backend.
GATED_COUNTS = ("turbo ran", "turbo passed")


@dataclass(frozen=True)
class Tolerance:
    """Within tolerance when |a - b| <= absolute, or <= relative × max(|a|, |b|) (either suffices)."""

    relative: float | None = None
    absolute: float | None = None

    def ok(self, a: float, b: float) -> bool:
        diff = abs(a - b)
        if self.absolute is not None and diff <= self.absolute:
            return True
        return self.relative is not None and diff <= self.relative * max(abs(a), abs(b))

    def describe(self) -> str:
        parts = ([f"{self.absolute:g} absolute"] if self.absolute is not None else []) + (
            [f"{self.relative * 100:g}% relative"] if self.relative is not None else [])
        return " or ".join(parts)


def parse_tolerance(text: str, what: str) -> Tolerance:
    """`0.5%` (relative), `0.002` (absolute) or both, comma-separated (`0.002,5%`)."""
    rel = absolute = None
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if part.endswith("%"):
                rel = float(part[:-1]) / 100
            else:
                absolute = float(part)
        except ValueError:
            raise LacqError(f"{what}: expected a number, a percentage or both (e.g. 0.002,5%), got {text!r}") from None
    if (rel is not None and rel < 0) or (absolute is not None and absolute < 0) or (rel is None and absolute is None):
        raise LacqError(f"{what}: expected a non-negative number, a percentage or both, got {text!r}")
    return Tolerance(rel, absolute)


def load_document(spec: str, store: Store | None) -> dict:
    """A parity JSON file, or `db:STUDY` / a study name in the results database."""
    path = Path(spec)
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LacqError(f"{spec} is not a parity document: {exc}") from None
        if not isinstance(doc, dict) or doc.get("suite") != SUITE or not isinstance(doc.get("configs"), list):
            raise LacqError(f"{spec} is not a `lacq parity` document (no suite {SUITE!r} with configs)")
        doc.setdefault("_source", str(path))
        return doc
    study = spec[3:] if spec.startswith("db:") else spec
    if store is not None:
        rows = store.results(study=study)
        if rows:
            return study_document(study, rows)
    if spec.startswith("db:") or not path.suffix:
        raise LacqError(f"no study {study!r} in the results database"
                        + (f" {store.path}" if store is not None else "") + f", and no file {spec}")
    raise LacqError(f"{spec} does not exist")


def study_document(study: str, rows: list) -> dict:
    """A stored study as a document: its parity result where it has one, else its KLD and PPL rows
    (one configuration per label)."""
    parity = [r for r in rows if r.kind == "parity"]
    if parity:
        doc = dict(parity[-1].metrics)
        doc["_source"] = f"db:{study}"
        return doc
    configs: dict[str, dict] = {}
    for label, r in latest_by_label(rows, "ppl").items():
        configs[label] = {"name": label, "status": "ok", "ppl": r.metrics.get("ppl"),
                          "ppl_error": r.metrics.get("ppl_error")}
    for label, r in latest_by_label(rows, "kld").items():
        row = configs.setdefault(label, {"name": label, "status": "ok"})
        row.update(kld=r.metrics.get("kld_mean"), kld_error=r.metrics.get("kld_mean_error"),
                   same_top_p_pct=r.metrics.get("same_top_p_pct"))
        row.setdefault("ppl", r.metrics.get("ppl_q"))
    if not configs:
        raise LacqError(f"study {study!r} has no PPL or KLD results to compare")
    last = rows[-1]
    return {"suite": STUDY_SUITE, "suite_version": None, "study": study, "backend": last.build.get("backend"),
            "device": None, "build_key": last.build.get("build_key"), "configs": list(configs.values()),
            "backend_ops": {"status": "not run"}, "_source": f"db:{study}"}


@dataclass
class Comparison:
    names: list[str]  # one per document
    rows: list[dict]  # config rows: name, per-document values, differences, verdict
    ops_rows: list[dict]  # op rows: per-document counts
    problems: list[str] = field(default_factory=list)  # each one makes the exit status non-zero
    notes: list[str] = field(default_factory=list)


def _names(docs: list[dict]) -> list[str]:
    names = [str(d.get("backend") or "?") for d in docs]
    if len(set(names)) == len(names):
        return names
    return [f"{n} ({Path(d.get('_source', str(i))).stem})" for i, (n, d) in enumerate(zip(names, docs))]


def check_comparable(docs: list[dict]) -> None:
    """Documents of different suites, versions, models or token sets cannot be compared at all."""
    first = docs[0]
    for d in docs[1:]:
        if (d.get("suite"), d.get("suite_version")) != (first.get("suite"), first.get("suite_version")):
            raise LacqError(f"suite versions differ: {first.get('_source')} is {first.get('suite')} "
                            f"v{first.get('suite_version')}, {d.get('_source')} is {d.get('suite')} "
                            f"v{d.get('suite_version')}; rerun `lacq parity` with one lacq version")
        if first.get("suite") != SUITE:
            continue
        for key in ("model", "ctx", "chunks"):
            a = first.get(key, {}).get("sha256") if key == "model" else first.get(key)
            b = d.get(key, {}).get("sha256") if key == "model" else d.get(key)
            if a != b:
                raise LacqError(f"{first.get('_source')} and {d.get('_source')} measured different {key}s "
                                f"({a} vs {b}); parity needs the same model and tokens")


def compare(docs: list[dict], tol_ppl: Tolerance, tol_kld: Tolerance) -> Comparison:
    if len(docs) < 2:
        raise LacqError("give at least two documents to compare")
    check_comparable(docs)
    names = _names(docs)
    out = Comparison(names, [], [])
    refs = {d.get("reference", {}).get("sha256") for d in docs if d.get("suite") == SUITE}
    same_reference = len(refs) <= 1
    if not same_reference:
        out.problems.append("the documents use different base logits (reference sha256 differ), so their KLDs "
                            "are not comparable: make the reference once on the CPU and pass it to every "
                            "backend with --base-logits")
    by_doc = [{c["name"]: c for c in d["configs"]} for d in docs]
    for n, configs in zip(names, by_doc):
        for c in configs.values():
            if c.get("status") == "failed":
                out.problems.append(f"{c['name']}: failed on {n}: {str(c.get('reason', '')).splitlines()[0]}")
    order = list(dict.fromkeys(name for d in docs for name in (c["name"] for c in d["configs"])))
    for cfg in order:
        row = {"config": cfg, "values": [], "diffs": [], "verdict": "ok"}
        base = by_doc[0].get(cfg)
        for i, configs in enumerate(by_doc):
            c = configs.get(cfg)
            row["values"].append(c)
            if i == 0:
                continue
            diff = {"ppl_pct": None, "kld": None}
            if not (c and base and c.get("status") == "ok" and base.get("status") == "ok"):
                missing = [n for n, x in ((names[0], base), (names[i], c)) if not x or x.get("status") != "ok"]
                diff["note"] = "not run on " + ", ".join(missing)
                if row["verdict"] == "ok":
                    row["verdict"] = "n/a"
                row["diffs"].append(diff)
                continue
            bad = []
            if base.get("ppl") is not None and c.get("ppl") is not None:
                diff["ppl_pct"] = (c["ppl"] - base["ppl"]) / base["ppl"] * 100
                if not tol_ppl.ok(base["ppl"], c["ppl"]):
                    bad.append("PPL")
            if base.get("kld") is not None and c.get("kld") is not None:
                diff["kld"] = c["kld"] - base["kld"]
                if same_reference and not tol_kld.ok(base["kld"], c["kld"]):
                    bad.append("KLD")
            if bad:
                row["verdict"] = "DIFFERS"
                out.problems.append(f"{cfg}: {names[i]} differs from {names[0]} in {' and '.join(bad)} "
                                    f"(PPL {base.get('ppl')} vs {c.get('ppl')}, KLD {base.get('kld')} vs "
                                    f"{c.get('kld')})")
            row["diffs"].append(diff)
        out.rows.append(row)
    _compare_ops(docs, names, out)
    return out


def _compare_ops(docs: list[dict], names: list[str], out: Comparison) -> None:
    ran = [(n, d["backend_ops"]) for n, d in zip(names, docs) if d.get("backend_ops", {}).get("status") == "ran"]
    for n, d in zip(names, docs):
        if d.get("backend_ops", {}).get("status") != "ran":
            out.notes.append(f"test-backend-ops did not run for {n}: its counts are not compared")
    for n, ops in ran:
        if ops.get("failed"):
            out.problems.append(f"test-backend-ops: {ops['failed']} case(s) failed on {n}")
        if (kvb := ops.get("kv_bytes")) and kvb.get("differ"):
            out.problems.append(f"test-kv-bytes: {kvb['differ']} of {kvb['blocks']} KV blocks differ from the "
                                f"reference quantizer's bytes on {n}")
        for error in ops.get("errors", []):
            out.problems.append(f"test-backend-ops on {n}: {error}")
    ops_names = list(dict.fromkeys(op for _, ops in ran for op in ops.get("ops", {})))
    for op in ops_names:
        counts = [ops["ops"].get(op, {}) for _, ops in ran]
        row = {"op": op, "counts": dict(zip([n for n, _ in ran], counts)), "verdict": "ok"}
        for key in GATED_COUNTS:
            values = {c.get(key, 0) for c in counts}
            if len(values) > 1:
                row["verdict"] = "DIFFERS"
                out.problems.append(f"test-backend-ops {op}: '{key}' differs: " + ", ".join(
                    f"{n} {c.get(key, 0)}" for (n, _), c in zip(ran, counts)))
        out.ops_rows.append(row)
