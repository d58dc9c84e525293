"""What weight recipes and KV policies share: found by name or path, TOML, `{param}` values.

A name (`first8_q8`) is looked up in the shipped directory; anything ending in
`.toml`, containing a `/` or naming an existing file is a path. A value that is
exactly `{name}` stands for parameter `name`; `--set name=value` replaces a
parameter's default and may only name parameters the file declares.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from lacq.errors import RecipeError

PARAM_REF = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def list_names(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))


def find_file(name_or_path: str | Path, directory: Path, what: str) -> Path:
    """The file a name or path refers to; unknown names list the shipped ones."""
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith(".toml") or "/" in text or path.is_file()):
        path = directory / f"{text}.toml"
        if not path.is_file():
            raise RecipeError(f"unknown {what} '{text}'; available: {', '.join(list_names(directory))}")
    if not path.is_file():
        raise RecipeError(f"{path}: no such {what} file")
    return path


def load_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from e


def with_overrides(params: dict[str, str], overrides: dict[str, str] | None, owner: str) -> dict[str, str]:
    """Defaults replaced by `--set` values; a parameter the file does not declare is an error."""
    out = dict(params)
    for key, value in (overrides or {}).items():
        if key not in out:
            raise RecipeError(f"{owner} has no parameter '{key}'; parameters: {', '.join(sorted(out)) or 'none'}")
        out[key] = value.strip().lower()
    return out


def substitute(value: str, params: dict[str, str]) -> str:
    """`{name}` -> that parameter's value; any other value as it is. Lower-cased (type names)."""
    m = PARAM_REF.match(value)
    return (params[m.group(1)] if m else value).lower()


def undefined_refs(values: list[str], params: dict[str, str]) -> list[str]:
    """The `{name}` values that refer to no declared parameter."""
    return [v for v in values if (m := PARAM_REF.match(v)) and m.group(1) not in params]
