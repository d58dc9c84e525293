"""The GitHub workflows: linted here with actionlint and zizmor, so a broken workflow fails this
suite rather than a run on GitHub; the properties the linters do not enforce (pinned actions,
no pull-request trigger on self-hosted runners, ...) are checked directly; and the script that
counts the Metal job's test-backend-ops cases is checked on the CUDA logs in bench/results/."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
CUDA_LOGS = REPO / "bench" / "results" / "test-backend-ops-cuda"

# Untrusted input expanded into a shell script, an unpinned action whose checkout keeps the
# token, default (write-all) permissions, and a key actionlint does not know.
BROKEN = """\
name: broken
on: issues
jobs:
  greet:
    runs-on: ubuntu-latest
    timeout-minute: 5
    steps:
      - uses: actions/checkout@v4
      - run: echo "${{ github.event.issue.title }}"
"""


def linter(name: str) -> str:
    """The linter next to this Python (a venv's bin/), else on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: install the test extra (pip install -e '.[test]')")
    return found


def actionlint(*files: Path, cwd: Path) -> subprocess.CompletedProcess:
    # cwd decides the project, and so .github/actionlint.yaml with the self-hosted labels.
    return subprocess.run([linter("actionlint"), "-no-color", "-oneline", *map(str, files)],
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def zizmor(*files: Path) -> subprocess.CompletedProcess:
    # --offline: no GitHub API calls, so this runs where only the package registries are reachable.
    env = {k: v for k, v in os.environ.items() if k not in ("GH_TOKEN", "GITHUB_TOKEN", "ZIZMOR_GITHUB_TOKEN")}
    return subprocess.run([linter("zizmor"), "--offline", "--no-progress", "--color", "never", *map(str, files)],
                          capture_output=True, text=True, timeout=60, env=env)


def load(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the bare key `on` as true
    return doc


def test_the_three_workflows_exist():
    assert {p.name for p in WORKFLOWS} == {"ci.yml", "metal.yml", "gpu-parity.yml"}


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_passes_actionlint(workflow):
    result = actionlint(workflow, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_passes_zizmor(workflow):
    result = zizmor(workflow)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_rejects_a_broken_workflow(tmp_path):
    workflow = tmp_path / ".github" / "workflows" / "broken.yml"
    workflow.parent.mkdir(parents=True)
    workflow.write_text(BROKEN)
    result = actionlint(workflow, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "timeout-minute" in result.stdout  # the unknown key
    assert "github.event.issue.title" in result.stdout and "untrusted" in result.stdout


def test_zizmor_rejects_a_broken_workflow(tmp_path):
    workflow = tmp_path / ".github" / "workflows" / "broken.yml"
    workflow.parent.mkdir(parents=True)
    workflow.write_text(BROKEN.replace("    timeout-minute: 5\n", ""))  # zizmor audits, it does not validate keys
    result = zizmor(workflow)
    assert result.returncode != 0, result.stdout + result.stderr
    for audit in ("template-injection", "artipacked"):
        assert audit in result.stdout, result.stdout


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_pins_actions_reads_only_and_times_out(workflow):
    doc = load(workflow)
    assert doc["permissions"] == {"contents": "read"}
    for name, job in doc["jobs"].items():
        assert "timeout-minutes" in job, f"{workflow.name}: job {name} has no timeout"
        assert "permissions" not in job, f"{workflow.name}: job {name} widens the permissions"
        for step in job["steps"]:
            uses = step.get("uses")
            if uses is None:
                continue
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", uses), f"{uses} is not pinned to a commit"
            if uses.startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False


def test_ci_runs_exactly_the_readme_test_command():
    job = load(REPO / ".github" / "workflows" / "ci.yml")["jobs"]["test"]
    runs = [step["run"].strip() for step in job["steps"] if "run" in step]
    assert "bash .ci/run" in runs
    python = [s["with"]["python-version"] for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python@")]
    assert python == ["3.11"]
    cached = {s["with"]["path"] for s in job["steps"] if s.get("uses", "").startswith("actions/cache@")}
    assert cached == {"~/.cache/ccache", "~/.cache/lacq-test"}


def test_gpu_parity_never_runs_on_pull_requests():
    doc = load(REPO / ".github" / "workflows" / "gpu-parity.yml")
    assert set(doc["on"]) == {"workflow_dispatch", "schedule"}
    self_hosted = [job["runs-on"] for job in doc["jobs"].values() if "self-hosted" in job["runs-on"]]
    assert self_hosted == [["self-hosted", "linux", "cuda"], ["self-hosted", "macos", "arm64", "metal"]]


def test_metal_job_names_the_device_test_backend_ops_knows():
    # The pinned tree names the Metal device MTL0; `-b Metal` would match nothing and pass.
    job = load(REPO / ".github" / "workflows" / "metal.yml")["jobs"]["metal"]
    scripts = "\n".join(step.get("run", "") for step in job["steps"])
    assert '"$bin/test-backend-ops" -b MTL0 -o "$op"' in scripts and "-b Metal" not in scripts
    assert "for op in SET_ROWS GET_ROWS CPY FLASH_ATTN_EXT;" in scripts


# ---------------------------------------------------------------- the test-backend-ops counter
def _summary_module():
    spec = importlib.util.spec_from_file_location("backend_ops_summary", REPO / ".ci" / "backend_ops_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_counts_the_cuda_runs_as_the_readme_states(capsys):
    summary = _summary_module()
    assert summary.main(["--backend", "CUDA0", *map(str, sorted(CUDA_LOGS.glob("tbo-*-all.log")))]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| op")}
    # op | ran | passed | failed | skipped | turbo ran | turbo passed | turbo failed | turbo skipped
    assert rows["SET_ROWS"] == "| SET_ROWS | 195 | 195 | 0 | 604 | 36 | 36 | 0 | 36 |"
    assert rows["GET_ROWS"] == "| GET_ROWS | 240 | 240 | 0 | 24 | 24 | 24 | 0 | 0 |"
    assert rows["CPY"] == "| CPY | 264 | 264 | 0 | 355 | 15 | 15 | 0 | 6 |"
    assert rows["FLASH_ATTN_EXT"] == "| FLASH_ATTN_EXT | 4162 | 4162 | 0 | 1326 | 180 | 180 | 0 | 0 |"


def test_summary_fails_when_the_named_backend_never_ran(capsys):
    summary = _summary_module()
    assert summary.main(["--backend", "MTL0", str(CUDA_LOGS / "tbo-GET_ROWS-all.log")]) == 1
    assert "MTL0 was never tested" in capsys.readouterr().err


def test_summary_fails_on_a_failed_case_and_never_counts_a_skip_as_a_pass(tmp_path, capsys):
    log = tmp_path / "tbo.log"
    log.write_text("Backend 1/2: MTL0\n  Device description: Apple Paravirtual device\n\n"
                   "  SET_ROWS(type_src=f32,type_dst=turbo2,r=1): \x1b[1;32mOK\x1b[0m\n"
                   "  SET_ROWS(type_src=f32,type_dst=turbo3,r=1): not supported [MTL0] \n"
                   "  SET_ROWS(type_src=f32,type_dst=f16,r=1): \x1b[1;31mFAIL\x1b[0m\n"
                   "  1/2 tests passed\n  Backend MTL0: \x1b[1;31mFAIL\x1b[0m\n"
                   "Backend 2/2: CPU\n  Skipping\n")
    assert _summary_module().main(["--backend", "MTL0", str(log)]) == 1
    out = capsys.readouterr()
    assert "| SET_ROWS | 2 | 1 | 1 | 1 | 1 | 1 | 0 | 1 |" in out.out
    assert "1 case(s) failed" in out.err
