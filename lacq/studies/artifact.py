"""The scan artifact: what a sensitivity scan measured, as versioned JSON that `lacq optimize` reads.

A scan measures, for each unit (a block, a tensor group, one tensor, or a KV
layer), the KL-divergence against the base when only that unit is raised from
the lowest candidate type to a higher one ("raise", the recovery) and when only
that unit is lowered from the highest candidate type ("lower", the damage). It
also measures every candidate type applied uniformly ("uniform"). Costs are
bytes for weights and bits × values for KV layers, so one optimizer serves both.

The optimizer is a pure function of this artifact and a budget; nothing in it
needs the model file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lacq.errors import LacqError
from lacq.fsutil import write_text_atomic

SCHEMA = "lacq.scan/1"


@dataclass(frozen=True)
class Kld:
    """One KL-divergence measurement (llama-perplexity's statistics), PPL beside it."""

    kld: float
    kld_error: float
    kld_p99: float | None = None
    ppl: float | None = None
    kld_p999: float | None = None  # the 99.9% quantile: the tail publishers report
    same_top_p: float | None = None  # % of tokens whose most likely token is the base's
    same_top_p_error: float | None = None
    result_id: int | None = None  # the stored result in the results database
    per_chunk: tuple[float, ...] = ()  # mean KLD of each chunk (same tokens in every variant: pairs)


@dataclass(frozen=True)
class Unit:
    id: str  # "blk.3", "attn_v", "blk.3.attn_v", "token_embd", "kv.7"
    kind: str  # block | group | tensor | embedding | output | kv_layer
    tensors: tuple[str, ...]  # weight tensors this unit holds (empty for KV layers)
    cost: dict[str, float]  # type -> bytes (weights) or bits × values (KV) of this unit at that type
    raise_: dict[str, Kld] = field(default_factory=dict)  # type -> KLD with only this unit raised to it
    lower: dict[str, Kld] = field(default_factory=dict)  # type -> KLD with only this unit lowered to it
    block: int | None = None  # block index where the unit lies in one block
    ordinal: int | None = None  # KV-layer ordinal (KV scans)
    replaced: dict[str, str] = field(default_factory=dict)  # type -> type llama.cpp writes instead (fallbacks)


@dataclass(frozen=True)
class Scan:
    kind: str  # weights | kv
    model: dict  # path, sha256, architecture, n_blocks, n_kv_layers
    base: dict  # weights: the unquantized base (path, sha256); kv: the reference cache type
    types: tuple[str, ...]  # candidate types, cheapest first
    units: tuple[Unit, ...]
    uniform: dict[str, Kld]  # type -> every unit at that type
    fixed_cost: float  # cost outside every unit (norms, the non-scanned part)
    chunks: int
    ctx: int
    cost_unit: str  # "bytes" or "bit-values"
    total_values: float = 0.0  # KV: values the scanned caches hold (bits/value = cost / total_values)
    excluded_types: dict[str, str] = field(default_factory=dict)  # type -> why it is not a candidate
    notes: tuple[str, ...] = ()
    provenance: dict = field(default_factory=dict)  # build, corpus, command, seconds
    schema: str = SCHEMA

    @property
    def lowest(self) -> str:
        return self.types[0]

    @property
    def highest(self) -> str:
        return self.types[-1]

    def to_json(self) -> str:
        d = asdict(self)
        for u in d["units"]:
            u["raise"] = u.pop("raise_")
        return json.dumps(d, indent=1, sort_keys=False)

    def write(self, path: Path) -> Path:
        write_text_atomic(Path(path), self.to_json() + "\n")
        return Path(path)

    @classmethod
    def from_json(cls, text: str, source: str = "<scan>") -> "Scan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LacqError(f"{source}: not a lacq scan (not JSON: {exc})") from None
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise LacqError(f"{source}: not a lacq scan of schema {SCHEMA} (schema {d.get('schema')!r})"
                            if isinstance(d, dict) else f"{source}: not a lacq scan")
        try:
            return cls._from_dict(d)
        except KeyError as exc:  # a field missing: say which, not a traceback
            raise LacqError(f"{source}: not a complete lacq scan: no {exc.args[0]!r} field") from None
        except (TypeError, AttributeError) as exc:
            raise LacqError(f"{source}: not a well-formed lacq scan ({exc})") from None

    @classmethod
    def _from_dict(cls, d: dict) -> "Scan":
        kld = lambda m: {t: Kld(**{**v, "per_chunk": tuple(v.get("per_chunk", ()))}) for t, v in m.items()}
        units = tuple(Unit(id=u["id"], kind=u["kind"], tensors=tuple(u["tensors"]), cost=u["cost"],
                           raise_=kld(u["raise"]), lower=kld(u["lower"]), block=u.get("block"),
                           ordinal=u.get("ordinal"), replaced=u.get("replaced", {})) for u in d["units"])
        return cls(kind=d["kind"], model=d["model"], base=d["base"], types=tuple(d["types"]), units=units,
                   uniform=kld(d["uniform"]), fixed_cost=d["fixed_cost"], chunks=d["chunks"], ctx=d["ctx"],
                   cost_unit=d["cost_unit"], total_values=d.get("total_values", 0.0),
                   excluded_types=d.get("excluded_types", {}), notes=tuple(d.get("notes", ())),
                   provenance=d.get("provenance", {}))

    @classmethod
    def read(cls, path: Path) -> "Scan":
        path = Path(path)
        if not path.is_file():
            raise LacqError(f"scan file {path} does not exist")
        return cls.from_json(path.read_text(), str(path))
