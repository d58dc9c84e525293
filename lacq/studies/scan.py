"""Per-unit sensitivity scans: which blocks, tensor groups, tensors or KV layers deserve the bits.

Weights (`scan_weights`): the base is quantized once per candidate type; every
variant is assembled from those files by copying tensor data (model/assemble.py,
no re-quantization) and measured by KL-divergence against the base's cached
logits, on the same tokens. KV (`scan_kv`): each KV layer's type is set by the
per-layer patch (by KV-layer ordinal), measured against the model's own logits
with an f16 cache. For each unit and candidate type: "raise" = only that unit
at the type, the rest at the lowest; "lower" = only that unit at the type, the
rest at the highest. Jobs run through studies/executor.py and are journaled in
the results database, so an interrupted scan resumes. The engine's variants can be
sharded over GPUs (`gpus`: an engine per GPU) or Ray actors (`ray`), see studies/engine.py.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf

from lacq import paths
from lacq.errors import LacqError
from lacq.fsutil import canonical_hash
from lacq.llama.build import Build
from lacq.measure.common import prepare_kv
from lacq.measure.kld import base_logits, check_kld_tokens, measure_kld
from lacq.model.assemble import assemble, assembly_hash
from lacq.model.info import FLOAT_TYPES, ModelInfo, inspect_model
from lacq.model.tokenizer import tokenizer_fingerprint
from lacq.plan.kv.cells import layer_values
from lacq.plan.kv.config import KvConfig, Override, check_kv_type
from lacq.plan.kv.types import kv_type
from lacq.plan.llama_quant import BASE_FTYPES, allows_quantization
from lacq.plan.recipe import check_weight_type, parse_recipe, resolve_recipe
from lacq.quantize import quantize_with_plan
from lacq.results.store import Store
from lacq.studies.artifact import Kld, Scan, Unit
from lacq.studies.engine import EngineSession, engine_available
from lacq.studies.engine_ray import RayEngines
from lacq.studies.executor import Job, run_jobs

Step = Callable[[str, float, str], None]  # (stage, fraction, detail)
Note = Callable[[str], None]  # a line for the person running the scan (the engine's memory, up front)
UNIT_KINDS = ("block", "group", "tensor")
DISK_MARGIN = 1 << 30


class ScanError(LacqError):
    """A scan cannot run as asked."""


def weight_bits(t: str) -> float:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.upper()]]
    return size * 8 / block


# ---------------------------------------------------------------- weights: inputs
def source_block_type(info: ModelInfo) -> str | None:
    """The quantized type most of the model's block weight matrices use (what its file was made with)."""
    counts: dict[str, int] = {}
    for t in info.tensors:
        if t.block is not None and allows_quantization(t) and t.type not in FLOAT_TYPES:
            counts[t.type] = counts.get(t.type, 0) + t.n_elements
    return max(counts, key=counts.get) if counts else None


def check_base(model: Path, info: ModelInfo, base: Path, base_info: ModelInfo) -> None:
    """The base must be an unquantized parent of the model: same architecture, tensors and tokenizer."""
    if base_info.is_quantized:
        kinds = sorted({t.type for t in base_info.tensors if len(t.shape) > 1} - FLOAT_TYPES)
        raise ScanError(f"the base {base.name} is quantized ({', '.join(kinds)}); a scan needs an unquantized base "
                        f"(F16/BF16/F32), e.g. `llama-quantize --allow-requantize {model.name} base.f16.gguf F16`")
    mine = {t.name: t.shape for t in info.tensors}
    theirs = {t.name: t.shape for t in base_info.tensors}
    if (info.architecture, info.n_blocks) != (base_info.architecture, base_info.n_blocks) or mine != theirs:
        diff = sorted(set(mine) ^ set(theirs))[:3] or [n for n in mine if mine[n] != theirs.get(n)][:3]
        raise ScanError(f"{base.name} is not an unquantized parent of {model.name}: "
                        f"{base_info.architecture}/{base_info.n_blocks} blocks vs {info.architecture}/{info.n_blocks}"
                        f"{'; tensors differ: ' + ', '.join(diff) if diff else ''}")
    if tokenizer_fingerprint(base) != tokenizer_fingerprint(model):
        raise ScanError(f"{base.name} and {model.name} tokenize differently; KL-divergence needs the same tokenizer")


def candidate_types(types: list[str], info: ModelInfo, include_source_type: bool) -> tuple[list[str], dict[str, str]]:
    """Validated candidate types, cheapest first, and the types left out with why."""
    out, excluded = [], {}
    for t in types:
        t = check_weight_type(t.strip(), "--types")
        if t in FLOAT_TYPES or t not in BASE_FTYPES:
            raise ScanError(f"--types: {t} cannot be a scan candidate; use quantized types llama-quantize takes "
                            f"as a base type: {', '.join(k for k in BASE_FTYPES if k not in FLOAT_TYPES)}")
        out.append(t)
    source = source_block_type(info)
    if source in out and not include_source_type:
        out.remove(source)
        excluded[source] = (f"the model file's own block type: from a base dequantized from {source}, {source} "
                            "re-creates the source grid and looks nearly lossless (--include-source-type to keep it)")
    if len(out) < 2:
        raise ScanError(f"a scan needs at least two candidate types; left: {', '.join(out) or 'none'}"
                        + (f" ({source} excluded: the model's own type)" if source in excluded else ""))
    return sorted(dict.fromkeys(out), key=weight_bits), excluded


def weight_units(info: ModelInfo, unit: str) -> list[tuple[str, str, tuple[str, ...], int | None]]:
    """(id, kind, tensor names, block) of each unit: blocks, groups (a tensor kind across blocks) or
    single tensors, plus token_embd and output (where not tied)."""
    quant = [t for t in info.tensors if allows_quantization(t)]
    out = []
    if unit == "block":
        for b in range(info.n_blocks):
            names = tuple(t.name for t in quant if t.block == b)
            if names:
                out.append((f"blk.{b}", "block", names, b))
    elif unit == "group":
        groups = list(dict.fromkeys(t.group for t in quant if t.block is not None))
        for g in groups:
            out.append((g, "group", tuple(t.name for t in quant if t.block is not None and t.group == g), None))
    elif unit == "tensor":
        out += [(f"blk.{t.block}.{t.group}", "tensor", (t.name,), t.block) for t in quant if t.block is not None]
    else:
        raise ScanError(f"unknown unit {unit!r}; use {', '.join(UNIT_KINDS)}")
    for t in quant:
        if t.block is None:
            kind = "embedding" if t.group.startswith("token_embd") else "output" if t.group == "output" else "extra"
            out.append((t.group, kind, (t.name,), None))
    return out


# ---------------------------------------------------------------- weights: the scan
def candidate_files(build: Build, store: Store, base: Path, base_info: ModelInfo, types: list[str], work: Path,
                    step: Step | None = None, imatrix: Path | None = None) -> dict[str, Path]:
    """One file per candidate type, every quantizable tensor at that type (llama.cpp's fallbacks apply);
    cached, so a second scan or a refinement of the same base and build re-uses them. With `imatrix`, quantized
    with it (their own names, beside the files made without one)."""
    files: dict[str, Path] = {}
    tag = f".imatrix-{store.sha256(imatrix)[:12]}" if imatrix else ""
    for i, t in enumerate(types):
        if step:
            step("quantize candidates", i / len(types), t)
        recipe = parse_recipe({"name": f"scan-{t}", "description": f"every tensor at {t}", "base": t,
                               "rules": [{"tensors": "*", "type": t}]}, source="<scan>")
        plan = resolve_recipe(recipe, base_info, imatrix=imatrix is not None)
        files[t] = quantize_with_plan(build, store, base, base_info, plan, force=True, imatrix=imatrix,
                                      output=work / f"{base.stem}.all-{t}{tag}.gguf").output
    if step:
        step("quantize candidates", 1.0, "done")
    return files


def work_dir(base_sha: str) -> Path:
    work = paths.sub("work") / "scan" / base_sha[:16]
    work.mkdir(parents=True, exist_ok=True)
    return work


@dataclass(frozen=True)
class WeightVariant:
    default: str  # type of every tensor not in `tensors`
    tensors: tuple[str, ...]
    type: str  # type of `tensors`


def scan_weights(build: Build, store: Store, model: Path, base: Path, corpus: Path, *, types: list[str],
                 units: tuple[str, ...] = ("block",), chunks: int = 4, ctx: int = 512, threads: int | None = None,
                 workers: int = 1, include_source_type: bool = False, step: Step | None = None,
                 engine: bool = True, note: Note | None = None, imatrix: Path | None = None,
                 gpus: Sequence[str] = (), ray: RayEngines | None = None) -> Scan:
    """`imatrix`: the candidate files are quantized with it (its sha256 joins the study key and the base record).
    `engine`: every variant measured in place by one engine process (studies/engine.py); off: each
    variant assembled into a file and measured by its own llama-perplexity run (the former path, for
    comparison). `gpus`: an engine per GPU (`workers` must be their number); `ray`: the engines on Ray actors
    (as many workers as actors)."""
    t0 = time.monotonic()
    info, base_info = inspect_model(model), inspect_model(base)
    check_base(model, info, base, base_info)
    check_kld_tokens(ctx, chunks)
    cands, excluded = candidate_types(types, info, include_source_type)
    for u in units:
        if u not in UNIT_KINDS:
            raise ScanError(f"unknown unit {u!r}; use {', '.join(UNIT_KINDS)}")
    base_sha = store.sha256(base)
    work = work_dir(base_sha)
    _check_disk(work, base_info, cands, chunks, ctx)
    files = candidate_files(build, store, base, base_info, cands, work, step, imatrix=imatrix)
    imatrix_sha = {"imatrix_sha256": store.sha256(imatrix)} if imatrix else {}
    cinfo = {t: inspect_model(p) for t, p in files.items()}
    lowest, highest = cands[0], cands[-1]
    study = "scan-weights:" + canonical_hash({"base": base_sha, "types": cands, "chunks": chunks, "ctx": ctx,
                                              "build": build.key, "corpus": store.sha256(corpus), **imatrix_sha})[:16]
    logits, _ = base_logits(build, store, base, base_info, corpus, ctx=ctx, chunks=chunks, threads=threads,
                            progress=(lambda f, d: step("base logits", f, d)) if step else None)
    unit_list = [u for kind in units for u in weight_units(base_info, kind)]
    unit_list = list({u[0]: u for u in unit_list}.values())  # token_embd/output appear once
    jobs = [Job(f"uniform {t}", WeightVariant(t, (), t)) for t in cands]
    for uid, _, names, _ in unit_list:
        jobs += [Job(f"{uid} raise {t}", WeightVariant(lowest, names, t)) for t in cands[1:]]
        jobs += [Job(f"{uid} lower {t}", WeightVariant(highest, names, t)) for t in cands[:-1]]

    def run(job: Job, st: Store) -> int:
        v: WeightVariant = job.spec
        if session is not None:
            return session.measure(st, label=job.key, study=study, tensors=engine_tensors(v, cinfo, lowest),
                                   kv=KvConfig(), corpus=corpus, record_model=files[v.default], base=base,
                                   base_sha256=base_sha)
        return measure_assembled(build, st, files, cinfo, v.default, {n: v.type for n in v.tensors}, base, base_info,
                                 corpus, work, ctx=ctx, chunks=chunks, threads=threads, label=job.key, study=study)

    # Variants whose files are byte for byte the same (a type llama.cpp replaces by another candidate, e.g. q6_k
    # by q8_0 on 576-wide rows; a unit already at the default's type) are measured once.
    unique: dict[tuple, Job] = {}
    alias = {job.key: unique.setdefault(_signature(job.spec, cinfo), job).key for job in jobs}
    session, workers = open_session(build, files[lowest], cinfo[lowest], logits, {t: files[t] for t in cands[1:]},
                                    ctx=ctx, threads=threads, engine=engine, note=note, workers=workers, gpus=gpus,
                                    ray=ray)
    try:
        ids = run_jobs(list(unique.values()), run, store, study, workers=workers,
                       progress=(lambda d, n, k: step("variants", d / n, f"{d}/{n} {k}")) if step else None)
    finally:
        if session is not None:
            session.close()
    kld = {key: stored_kld(store, ids[rep]) for key, rep in alias.items()}
    scanned = []
    for uid, kind, names, block in unit_list:
        cost = {t: float(sum(cinfo[t].tensor(n).n_bytes for n in names)) for t in cands}
        replaced = {}
        for t in cands:
            actual = sorted({cinfo[t].tensor(n).type for n in names})
            if actual != [t]:
                replaced[t] = ",".join(actual)
        scanned.append(Unit(id=uid, kind=kind, tensors=names, cost=cost, block=block, replaced=replaced,
                            raise_={t: kld[f"{uid} raise {t}"] for t in cands[1:]},
                            lower={t: kld[f"{uid} lower {t}"] for t in cands[:-1]}))
    quantizable = {n for _, _, names, _ in unit_list for n in names}
    # Budgets are file sizes: what no unit holds includes the header, metadata (the tokenizer) and padding.
    fixed = float(sum(t.n_bytes for t in cinfo[lowest].tensors if t.name not in quantizable))
    fixed += files[lowest].stat().st_size - cinfo[lowest].total_bytes
    notes = [f"{t} excluded: {why}" for t, why in excluded.items()]
    if len(unique) < len(jobs):
        notes.append(f"{len(jobs) - len(unique)} of {len(jobs)} variants were the same file as another after "
                     "llama.cpp's replacements and were measured once")
    for u in scanned:
        for t, actual in u.replaced.items():
            notes.append(f"{u.id} at {t}: llama.cpp writes {actual} (row size); costs and KLD use what it writes")
    return Scan(kind="weights", model={"path": str(model), "sha256": store.sha256(model),
                                       "architecture": info.architecture, "n_blocks": info.n_blocks,
                                       "n_elements": sum(t.n_elements for t in info.tensors),
                                       # header, metadata and padding: file bytes minus tensor bytes (for bpw)
                                       "overhead_bytes": files[lowest].stat().st_size - cinfo[lowest].total_bytes},
                base={"path": str(base), "sha256": base_sha, "logits": str(logits), **imatrix_sha}, types=tuple(cands),
                units=tuple(scanned), uniform={t: kld[f"uniform {t}"] for t in cands}, fixed_cost=fixed,
                chunks=chunks, ctx=ctx, cost_unit="bytes", excluded_types=excluded, notes=tuple(dict.fromkeys(notes)),
                provenance={"study": study, "build": build.provenance(), "corpus_sha256": store.sha256(corpus),
                            "seconds": round(time.monotonic() - t0, 1), "files": {t: str(p) for t, p in files.items()}})


def open_session(build: Build, model: Path, info: ModelInfo, logits: Path, candidates: dict[str, Path], *, ctx: int,
                 threads: int | None, engine: bool, note: Note | None, workers: int, gpus: Sequence[str],
                 ray: RayEngines | None) -> tuple[EngineSession | None, int]:
    """The scan's engines (None: the former path) and how many variants are measured at once."""
    if not (engine and engine_available(build, note)):
        if gpus or ray:
            raise ScanError("--gpus and --executor ray shard the evaluation engine's variants, and this scan runs "
                            "without it (--no-engine, or a build without its patch)")
        return None, workers
    session = EngineSession(build, model, info, logits, candidates, ctx=ctx, threads=threads, gpus=gpus, remote=ray,
                            note=note, engines_per_gpu=workers)
    if ray is not None:
        workers = ray.actors
    elif gpus and workers != len(gpus):
        session.close()
        raise ScanError(f"{len(gpus)} GPUs need {len(gpus)} workers, one engine each; got {workers}")
    return session, workers


def measure_assembled(build: Build, store: Store, files: dict[str, Path], cinfo: dict[str, ModelInfo], default: str,
                      tensors: dict[str, str], base: Path, base_info: ModelInfo, corpus: Path, work: Path, *,
                      ctx: int, chunks: int, threads: int | None, label: str, study: str) -> int:
    """KLD against the base of the candidate file of type `default` with `tensors` (name -> type) copied in from
    the other candidate files (model/assemble.py); the result id. The variant is filed under the hash of its
    recipe (the candidate files' hashes and `tensors`), neither read again to hash it nor kept in the file-hash
    cache: it lives only as long as its measurement."""
    if not tensors:
        return measure_kld(build, store, files[default], cinfo[default], base, base_info, KvConfig(), corpus, ctx=ctx,
                           chunks=chunks, threads=threads, label=label, study=study).result_id
    sources = {t: files[t] for t in set(tensors.values())}
    digest = assembly_hash(store.sha256(files[default]), {t: store.sha256(f) for t, f in sources.items()}, tensors)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        path = assemble(files[default], sources, tensors, Path(tmp) / "variant.gguf")
        # made from candidate files quantized with an importance matrix (or none): its results say which
        made = store.cache.artifact_info(files[default], store.sha256(files[default]))
        with store.cache.stand_in(path, digest, {k: v for k, v in made.items() if k == "imatrix_sha256"}):
            return measure_kld(build, store, path, inspect_model(path), base, base_info, KvConfig(), corpus, ctx=ctx,
                               chunks=chunks, threads=threads, label=label, study=study).result_id


def engine_tensors(v: WeightVariant, cinfo: dict[str, ModelInfo], lowest: str) -> dict[str, str]:
    """The tensors the engine points at another candidate for `v`, its model being the `lowest` candidate's
    file: each tensor comes from `v.type`'s file if `v` names it, else from `v.default`'s, and only those of
    another type than in the lowest file differ (llama-quantize is deterministic; see `_signature`)."""
    return choice_tensors({n: v.type for n in v.tensors}, v.default, cinfo, lowest)


def choice_tensors(plan: Mapping[str, str], default: str, cinfo: dict[str, ModelInfo], lowest: str) -> dict[str, str]:
    """The engine's tensor map (tensor name -> candidate) for a file holding `plan` (tensor name -> type) and
    `default` elsewhere, the engine's model being the `lowest` candidate's file (see `engine_tensors`)."""
    out = {}
    for t in cinfo[lowest].tensors:
        src = plan.get(t.name, default)
        if src != lowest and cinfo[src].tensor(t.name).type != t.type:
            out[t.name] = src
    return out


def _signature(v: WeightVariant, cinfo: dict) -> tuple:
    """What a variant's file holds. llama-quantize is deterministic, so a tensor of the same type (after its
    replacements) in two candidate files has the same bytes: only tensors whose type differs from the
    default's change the file."""
    changed = tuple((n, cinfo[v.type].tensor(n).type) for n in v.tensors
                    if cinfo[v.type].tensor(n).type != cinfo[v.default].tensor(n).type)
    return v.default, changed


def stored_kld(store: Store, result_id: int) -> Kld:
    m = store.get(result_id).metrics
    # llama-perplexity prints the running mean after each chunk; chunks score equally many tokens
    running = [c["kld"] for c in m.get("chunks", [])]
    per_chunk = tuple(round(i * v - (i - 1) * p, 7) for i, (v, p) in enumerate(zip(running, [0.0] + running), 1))
    return Kld(kld=m["kld_mean"], kld_error=m["kld_mean_error"], kld_p99=m["kld_quantiles"].get("p99"),
               kld_p999=m["kld_quantiles"].get("p99.9"), same_top_p=m.get("same_top_p_pct"),
               same_top_p_error=m.get("same_top_p_error_pct"),
               ppl=m["ppl_q"], result_id=result_id, per_chunk=per_chunk)


def _check_disk(work: Path, base_info: ModelInfo, types: list[str], chunks: int, ctx: int) -> None:
    """Refuse up front when the candidate files, one variant at a time and the logits cannot fit."""
    n_el = sum(t.n_elements for t in base_info.tensors)
    need = sum(n_el * weight_bits(t) / 8 for t in types) + n_el * weight_bits(types[-1]) / 8
    need += chunks * (ctx - 1 - ctx // 2) * (base_info.n_vocab or 0) * 2
    free = shutil.disk_usage(work).free
    if need + DISK_MARGIN > free:
        raise ScanError(f"the scan needs about {need / 1e9:.1f} GB (a file per candidate type, one variant at a "
                        f"time, the base logits) and {work} has {free / 1e9:.1f} GB free")


# ---------------------------------------------------------------- KV layers
@dataclass(frozen=True)
class KvVariant:
    default: str
    ordinal: int | None
    type: str


def scan_kv(build: Build, store: Store, model: Path, corpus: Path, *, types: list[str], cache: str = "v",
            other: str = "q8_0", chunks: int = 4, ctx: int = 512, threads: int | None = None, workers: int = 1,
            step: Step | None = None, engine: bool = True, note: Note | None = None, gpus: Sequence[str] = (),
            ray: RayEngines | None = None) -> Scan:
    """Each KV layer (by ordinal) alone raised from the lowest type and alone lowered from the highest.

    `cache` is the scanned cache ("v", "k" or "both"); the other cache stays at `other`. KLD is against
    the same model with an f16 cache (its logits cached like a weight base's).
    """
    t0 = time.monotonic()
    info = inspect_model(model)
    if cache not in ("v", "k", "both"):
        raise ScanError(f"--cache must be v, k or both, got {cache!r}")
    check_kld_tokens(ctx, chunks)
    cands = sorted(dict.fromkeys(check_kv_type(t.strip(), "--types") for t in types),
                   key=lambda t: kv_type(t).bits_per_value)
    if len(cands) < 2:
        raise ScanError("a KV scan needs at least two candidate types")
    n_kv = len(info.kv_blocks)
    if n_kv == 0:
        raise ScanError(f"{model.name} has no attention KV cache to scan")
    lowest, highest = cands[0], cands[-1]

    def config(v: KvVariant) -> KvConfig:
        return kv_variant_config(cache, other, v.default, {} if v.ordinal is None else {v.ordinal: v.type})

    for t in cands:  # every type on this backend and head size, before any work
        prepare_kv(build, config(KvVariant(t, 0, highest)), info)
    study = "scan-kv:" + canonical_hash({"model": store.sha256(model), "types": cands, "cache": cache,
                                         "other": other, "chunks": chunks, "ctx": ctx, "build": build.key,
                                         "corpus": store.sha256(corpus)})[:16]
    logits, _ = base_logits(build, store, model, info, corpus, ctx=ctx, chunks=chunks, threads=threads,
                            progress=(lambda f, d: step("f16-cache logits", f, d)) if step else None)
    jobs = [Job(f"uniform {t}", KvVariant(t, None, t)) for t in cands]
    for o in range(n_kv):
        jobs += [Job(f"kv.{o} raise {t}", KvVariant(lowest, o, t)) for t in cands[1:]]
        jobs += [Job(f"kv.{o} lower {t}", KvVariant(highest, o, t)) for t in cands[:-1]]

    def run(job: Job, st: Store) -> int:
        if session is not None:
            return session.measure(st, label=job.key, study=study, tensors={}, kv=prepare_kv(build, config(job.spec),
                                   info), corpus=corpus, record_model=model, base=model, base_sha256=model_sha)
        return measure_kld(build, st, model, info, model, info, config(job.spec), corpus, ctx=ctx, chunks=chunks,
                           threads=threads, label=job.key, study=study).result_id

    model_sha = store.sha256(model)
    session, workers = open_session(build, model, info, logits, {}, ctx=ctx, threads=threads, engine=engine,
                                    note=note, workers=workers, gpus=gpus, ray=ray)
    try:
        ids = run_jobs(jobs, run, store, study, workers=workers,
                       progress=(lambda d, n, k: step("variants", d / n, f"{d}/{n} {k}")) if step else None)
    finally:
        if session is not None:
            session.close()
    kld = {key: stored_kld(store, rid) for key, rid in ids.items()}
    # Cost: bits × values; each KV layer holds n_head_kv × head size values per token per cache, and an
    # iSWA layer's sliding-window cache holds at most its window of tokens.
    values = layer_values(info, ctx, cache)
    units = tuple(Unit(id=f"kv.{o}", kind="kv_layer", tensors=(), block=info.kv_blocks[o], ordinal=o,
                       cost={t: kv_type(t).bits_per_value * values[o] for t in cands},
                       raise_={t: kld[f"kv.{o} raise {t}"] for t in cands[1:]},
                       lower={t: kld[f"kv.{o} lower {t}"] for t in cands[:-1]}) for o in range(n_kv))
    return Scan(kind="kv", model={"path": str(model), "sha256": store.sha256(model), "architecture": info.architecture,
                                  "n_blocks": info.n_blocks, "n_kv_layers": n_kv},
                base={"cache": cache, "reference": "f16", "other": other, "logits": str(logits)}, types=tuple(cands),
                units=units, uniform={t: kld[f"uniform {t}"] for t in cands}, fixed_cost=0.0, chunks=chunks, ctx=ctx,
                cost_unit="bit-values", total_values=float(sum(values)),
                notes=(f"{'K and V' if cache == 'both' else cache.upper()} scanned; "
                       f"{'V' if cache == 'k' else 'K'} at {other}" if cache != "both" else "K and V scanned together",),
                provenance={"study": study, "build": build.provenance(), "corpus_sha256": store.sha256(corpus),
                            "seconds": round(time.monotonic() - t0, 1)})


def kv_variant_config(cache: str, other: str, default: str, layers: dict[int, str]) -> KvConfig:
    """The scanned cache(s) at `default` with `layers` (KV-layer ordinal -> type) overriding it; the other
    cache at `other`. How a KV scan runs its variants (and a refinement its choices)."""
    over = tuple(Override(o, o, t) for o, t in sorted(layers.items()))
    k = default if cache in ("k", "both") else other
    v = default if cache in ("v", "both") else other
    return KvConfig(k, v, "auto", over if cache in ("k", "both") else (), over if cache in ("v", "both") else ())
