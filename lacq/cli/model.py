"""`lacq inspect` and `lacq recipes`: what is in a model, and what the shipped recipes would make of it."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from lacq.cli import cli
from lacq.cli.common import console, handle_errors, json_option, parse_sets


@cli.command(name="inspect")
@click.argument("model", type=click.Path(path_type=Path))
@json_option
@click.option("--tensors/--no-tensors", default=True, help="List every tensor grouped by block.")
@handle_errors
def inspect_cmd(model, as_json, tensors):
    """Architecture, blocks, KV-layer ordinals and tensors of a GGUF model."""
    from lacq.model.info import inspect_model
    info = inspect_model(model)
    if as_json:
        click.echo(json.dumps(info.to_dict(), indent=1))
        return
    console.print(f"[bold]{model}[/bold]  {info.architecture}  {info.file_type or ''}")
    console.print(f"blocks {info.n_blocks}, heads {info.n_head}, KV heads {info.n_head_kv}, head size {info.head_dim}, "
                  f"context {info.n_ctx_train}, {info.total_bytes / 1e6:.1f} MB, {info.bpw:.2f} bits/weight")
    ordinals = info.kv_ordinal_map()
    console.print(f"KV layers: {len(ordinals)} of {info.n_blocks} blocks")
    swa = set(info.swa_blocks)
    if info.is_iswa:
        full = [b for b in info.kv_blocks if b not in swa]
        console.print(f"two KV caches (iSWA): sliding-window cache, window {info.swa_window} tokens, for blocks "
                      f"{_ranges(info.swa_blocks)}; full-context cache for blocks {_ranges(full) or 'none'}")
        console.print("  KV-layer ordinals count over both caches, in block order")
    kv_table = Table("KV ordinal", "block", *(["cache"] if info.is_iswa else []), title="KV-layer ordinal map")
    for block, ordinal in ordinals.items():
        cache = ["sliding-window" if block in swa else "full"] if info.is_iswa else []
        kv_table.add_row(str(ordinal), str(block), *cache)
    if len(ordinals) != info.n_blocks or info.is_iswa:
        console.print(kv_table)
    else:
        console.print("  (pure attention: ordinal = block index)")
    if not tensors:
        return
    # Plain aligned columns: a rich table of a model's hundreds of tensors takes longer to lay out
    # than reading the model.
    rows = [("block", "tensor", "type", "shape", "elements", "bytes")]
    for block, items in info.tensors_by_block().items():
        rows += [("-" if block is None else str(block), t.name, t.type, "x".join(map(str, t.shape)),
                  f"{t.n_elements:,}", f"{t.n_bytes:,}") for t in items]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = (False, False, False, False, True, True)
    click.echo("\n".join("  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()
                         for row in rows))


def _ranges(blocks) -> str:
    """0, 1, 2, 4 -> '0-2, 4'."""
    out: list[list[int]] = []
    for b in blocks:
        if out and b == out[-1][1] + 1:
            out[-1][1] = b
        else:
            out.append([b, b])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


@cli.group(name="recipes")
def recipes_group():
    """Weight recipes (recipes/*.toml)."""


@recipes_group.command(name="list")
@json_option
@handle_errors
def recipes_list(as_json):
    """List the shipped weight recipes."""
    from lacq.plan.recipe import list_recipes, load_recipe
    rows = [load_recipe(n) for n in list_recipes()]
    if as_json:
        click.echo(json.dumps([{"name": r.name, "description": r.description} for r in rows], indent=1))
        return
    table = Table("recipe", "description")
    for r in rows:
        table.add_row(r.name, r.description)
    console.print(table)


@recipes_group.command(name="show")
@click.argument("name")
@click.option("--model", "model_spec", default=None, help="Resolve against this model and show the plan.")
@click.option("--set", "sets", multiple=True, metavar="PARAM=VALUE", help="Override a recipe parameter.")
@handle_errors
def recipes_show(name, model_spec, sets):
    """Print a recipe's TOML, and with --model the --tensor-type-file plan it resolves to."""
    from lacq.model.info import inspect_model
    from lacq.model.resolve import resolve_model
    from lacq.plan.recipe import load_recipe, resolve_recipe
    recipe = load_recipe(name)
    click.echo(Path(recipe.source).read_text().rstrip())
    if model_spec:
        plan = resolve_recipe(recipe, inspect_model(resolve_model(model_spec)), parse_sets(sets))
        click.echo(f"\n# base ftype {plan.base_ftype}; {len(plan.rules)} rules; predicted "
                   f"{plan.predicted_bytes / 1e6:.1f} MB, {plan.predicted_bpw:.2f} bits/weight")
        click.echo(plan.tensor_type_file_text(), nl=False)
