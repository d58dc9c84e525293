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
    study = spec.removeprefix("db:")
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
    (one configuration per label, each with what its rows measured: model, context, chunks, corpus)."""
    parity = [r for r in rows if r.kind == "parity"]
    if parity:
        doc = dict(parity[-1].metrics)
        doc["_source"] = f"db:{study}"
        return doc
    configs: dict[str, dict] = {}
    used: dict[str, list] = {}  # label -> the rows its values come from
    for label, r in latest_by_label(rows, "ppl").items():
        configs[label] = {"name": label, "status": "ok", "ppl": r.metrics.get("ppl"),
                          "ppl_error": r.metrics.get("ppl_error")}
        used[label] = [r]
    for label, r in latest_by_label(rows, "kld").items():
        row = configs.setdefault(label, {"name": label, "status": "ok"})
        row.update(kld=r.metrics.get("kld_mean"), kld_error=r.metrics.get("kld_mean_error"),
                   same_top_p_pct=r.metrics.get("same_top_p_pct"))
        row.setdefault("ppl", r.metrics.get("ppl_q"))
        used.setdefault(label, []).append(r)
    if not configs:
        raise LacqError(f"study {study!r} has no PPL or KLD results to compare")
    for label, row in configs.items():
        row["measured"] = _measured(used[label])
    doc_measured = _measured([r for rs in used.values() for r in rs])
    last = rows[-1]
    return {"suite": STUDY_SUITE, "suite_version": None, "study": study, "backend": last.build.get("backend"),
            "device": None, "build_key": last.build.get("build_key"), "configs": list(configs.values()),
            "model": {"sha256": doc_measured["model"]}, "ctx": doc_measured["ctx"],
            "chunks": doc_measured["chunks"], "backend_ops": {"status": "not run"}, "_source": f"db:{study}"}


_MEASURED = {"model": "model_sha256", "ctx": "ctx", "chunks": "chunks", "corpus": "corpus_sha256"}
_PLURAL = {"model": "models", "ctx": "contexts", "chunks": "chunk counts", "corpus": "corpora"}


def _measured(rows: list) -> dict:
    """What result rows measured, from their provenance: one value per key, or the sorted distinct
    values where the rows differ."""
    out = {}
    for key, column in _MEASURED.items():
        values = sorted({getattr(r, column) for r in rows}, key=str)
        out[key] = values[0] if len(values) == 1 else values
    return out


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


def check_comparable(docs: list[dict]) -> list[str]:
    """Documents of different suites or suite versions cannot be compared at all (an error); the
    problems of documents that measured different models, contexts, chunk counts (or corpora, where
    known), which make their numbers incomparable, are returned."""
    first = docs[0]
    problems = []
    for d in docs[1:]:
        if (d.get("suite"), d.get("suite_version")) != (first.get("suite"), first.get("suite_version")):
            raise LacqError(f"suite versions differ: {first.get('_source')} is {first.get('suite')} "
                            f"v{first.get('suite_version')}, {d.get('_source')} is {d.get('suite')} "
                            f"v{d.get('suite_version')}; rerun `lacq parity` with one lacq version")
        differ = {}
        pairs = ([(_doc_measured(first), _doc_measured(d))] if first.get("suite") == SUITE else
                 [(_what_measured(first, c["name"]), _what_measured(d, c["name"])) for c in d["configs"]])
        for a, b in pairs:
            if a is None or b is None:
                continue
            for key in _MEASURED:
                if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]:
                    differ.setdefault(key, (a[key], b[key]))
        if differ:
            problems.append(f"{first.get('_source')} and {d.get('_source')} measured different "
                            + ", ".join(f"{_PLURAL[key]} ({_short(x)} vs {_short(y)})" for key, (x, y) in differ.items())
                            + ": parity needs the same model and tokens")
    return problems


def _doc_measured(doc: dict) -> dict:
    """A parity document's model sha256, context and chunks (its corpus is checked through the reference)."""
    return {"model": (doc.get("model") or {}).get("sha256"), "ctx": doc.get("ctx"), "chunks": doc.get("chunks")}


def _what_measured(doc: dict, config: str) -> dict | None:
    """What one configuration of a study document measured (its rows' provenance); None where the
    document does not have it."""
    row = next((c for c in doc["configs"] if c["name"] == config), None)
    return None if row is None else row.get("measured")


def _short(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(_short, value)) + "]"
    return value[:12] if isinstance(value, str) and len(value) == 64 else str(value)


def compare(docs: list[dict], tol_ppl: Tolerance, tol_kld: Tolerance, allow_partial: bool = False) -> Comparison:
    """Every document against the first. A configuration run on one side only, or test-backend-ops
    run on one side only, is a problem unless `allow_partial` (then a note); a document that shares
    no measured configuration with the first is a problem in any case: it compared nothing."""
    if len(docs) < 2:
        raise LacqError("give at least two documents to compare")
    names = _names(docs)
    out = Comparison(names, [], [])
    out.problems += check_comparable(docs)
    if out.problems:  # numbers of different models or tokens say nothing about the backends
        return out
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
    compared = [0] * len(docs)  # per document: configurations compared with the first
    one_sided: list[list[str]] = [[] for _ in docs]  # per document: "config (why)" run on one side only
    for cfg in order:
        row = {"config": cfg, "values": [], "diffs": [], "verdict": "ok"}
        base = by_doc[0].get(cfg)
        for i, configs in enumerate(by_doc):
            c = configs.get(cfg)
            row["values"].append(c)
            if i == 0:
                continue
            diff = {"ppl_pct": None, "kld": None}
            row["diffs"].append(diff)
            if not (_ran(base) and _ran(c)):
                missing = [(n, x) for n, x in ((names[0], base), (names[i], c)) if not _ran(x)]
                diff["note"] = "not run on " + ", ".join(n for n, _ in missing)
                if len(missing) == 1 and not _failed(missing[0][1]):  # a failure is a problem of its own
                    n, x = missing[0]
                    one_sided[i].append(f"{cfg} ({n}: {x.get('status', '?') if x else 'absent'})")
                    if row["verdict"] == "ok":
                        row["verdict"] = "n/a" if allow_partial else "ONE-SIDED"
                elif row["verdict"] == "ok":
                    row["verdict"] = "failed" if any(_failed(x) for _, x in missing) else "n/a"
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
            if diff["ppl_pct"] is not None or diff["kld"] is not None:
                compared[i] += 1
            if bad:
                row["verdict"] = "DIFFERS"
                out.problems.append(f"{cfg}: {names[i]} differs from {names[0]} in {' and '.join(bad)} "
                                    f"(PPL {base.get('ppl')} vs {c.get('ppl')}, KLD {base.get('kld')} vs "
                                    f"{c.get('kld')})")
        out.rows.append(row)
    for i in range(1, len(docs)):
        if one_sided[i]:
            text = (f"{len(one_sided[i])} configuration(s) ran on only one of {names[0]} and {names[i]}: "
                    + ", ".join(one_sided[i]))
            if allow_partial:
                out.notes.append(text + " (not compared; --allow-partial)")
            else:
                out.problems.append(text + "; pass --allow-partial to accept a partial comparison")
        if not compared[i]:
            out.problems.append(f"compared nothing: no configuration was measured on both {names[0]} and {names[i]}")
    _compare_ops(docs, names, out, allow_partial)
    return out


def _ran(c: dict | None) -> bool:
    return bool(c) and c.get("status") == "ok"


def _failed(c: dict | None) -> bool:
    return bool(c) and c.get("status") == "failed"


def _compare_ops(docs: list[dict], names: list[str], out: Comparison, allow_partial: bool) -> None:
    ran = [(n, d["backend_ops"]) for n, d in zip(names, docs) if d.get("backend_ops", {}).get("status") == "ran"]
    not_ran = [n for n, d in zip(names, docs) if d.get("backend_ops", {}).get("status") != "ran"]
    if not ran:
        out.notes.append("test-backend-ops ran for none of the documents: no counts to compare")
    elif not_ran:
        text = (f"test-backend-ops ran for {', '.join(n for n, _ in ran)} but not for {', '.join(not_ran)}: "
                "those counts are not compared")
        if allow_partial:
            out.notes.append(text + " (--allow-partial)")
        else:
            out.problems.append(text + "; pass --allow-partial to accept a partial comparison")
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
