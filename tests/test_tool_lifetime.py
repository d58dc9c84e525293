"""A llama.cpp tool lives no longer than the process that runs it, however that process ends
(SIGKILL included: a lost sweep worker, an out-of-memory kill)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from procutil import descendants, gone_within, kill_survivors

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

# A stand-in tool: says it started, then hangs without writing (so no SIGPIPE would end it either).
TOOL = ["sh", "-c", "echo started; exec sleep 60"]
WORKER = {
    "run_tool": "from lacq.llama.tools.base import run_tool; run_tool({tool!r})",
    "run_captured": "import os; from lacq.llama.tools.base import run_captured; run_captured({tool!r}, env=os.environ)",
    # the build's runner: cmake and its compilers, in a process session of their own
    "build": ("import os, pathlib, tempfile; from lacq.llama.build import _run_logged; "
              "_run_logged({tool!r}, pathlib.Path(tempfile.mkdtemp()) / 'log', dict(os.environ), None, 0, 1)"),
}


@pytest.mark.parametrize("runner", sorted(WORKER))
def test_a_killed_worker_takes_its_tool_with_it(runner):
    worker = subprocess.Popen([sys.executable, "-c", WORKER[runner].format(tool=TOOL)])
    tools: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not tools and time.monotonic() < deadline and worker.poll() is None:
            tools[:] = [p for p, name in descendants(worker.pid).items() if name == "sleep"]
            time.sleep(0.05)
        assert tools, "the stand-in tool never started"
        worker.send_signal(signal.SIGKILL)  # no handler, no cleanup: only the kernel can stop the tool now
        worker.wait(timeout=10)
        assert gone_within(tools, 5), "the tool outlived the worker that ran it"
    finally:
        worker.kill()
        kill_survivors(tools)
