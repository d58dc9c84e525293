"""Output for scripts and logs: plain progress lines when stderr is not a terminal."""

from __future__ import annotations

import io

from rich.console import Console

from lacq.cli import common


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_prints_a_line_per_stage_and_at_most_every_30_s():
    out, clock = io.StringIO(), Clock()
    with common.PlainProgress(Console(file=out, width=200), every=30, clock=clock) as progress:
        task = progress.add_task("perplexity", total=1.0, detail="f16/f16")
        for i in range(1, 21):  # a chunk every 4 s: 80 s in all
            clock.now += 4
            progress.update(task, completed=i / 20, detail=f"chunk {i}/20")
        other = progress.add_task("quantize", total=1.0, detail="")
        progress.update(other, completed=1.0, detail="done")
        progress.update(other, completed=1.0, detail="done")  # finished once, said once
    assert out.getvalue().splitlines() == [
        "[    0 s] perplexity: 0% f16/f16",
        "[   32 s] perplexity: 40% chunk 8/20",
        "[   64 s] perplexity: 80% chunk 16/20",
        "[   80 s] perplexity: 100% chunk 20/20",
        "[   80 s] quantize: 0%",
        "[   80 s] quantize: 100% done",
    ]


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(common, "err_console", Console(file=io.StringIO()))
    assert isinstance(common.progress_bar(), common.PlainProgress)
    monkeypatch.setattr(common, "err_console", Console(file=io.StringIO(), force_terminal=True))
    assert not isinstance(common.progress_bar(), common.PlainProgress)
