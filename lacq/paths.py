"""Where lacq keeps its caches, builds and results.

Everything lives under one home directory so tests can isolate it with one
environment variable (LACQ_HOME).
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

# The repository root when lacq runs from a checkout (editable install); the
# shipped recipes, patches and corpus live there.
REPO_ROOT = Path(__file__).resolve().parent.parent


def home() -> Path:
    env = os.environ.get("LACQ_HOME")
    root = Path(env) if env else Path(platformdirs.user_data_dir("lacq"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def sub(name: str) -> Path:
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def patches_dir() -> Path:
    """The patch series lacq builds with. LACQ_PATCHES_DIR (a development switch) points it at another
    directory with its own `series`, e.g. a series with a patch under development appended."""
    env = os.environ.get("LACQ_PATCHES_DIR")
    return Path(env) if env else REPO_ROOT / "patches"


def recipes_dir() -> Path:
    return REPO_ROOT / "recipes"


def default_corpus() -> Path:
    return REPO_ROOT / "data" / "wikitext-2-raw" / "wiki.test.raw"


def default_db() -> Path:
    return home() / "results.sqlite"
