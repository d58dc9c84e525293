"""`lacq build`: the patched llama.cpp tools for a backend."""

from __future__ import annotations

import time

import click

from lacq.cli import cli
from lacq.cli.common import BuildChoice, build_options, console, handle_errors, progress_bar
from lacq.llama.build import BuildSpec, find_build, prepared_source
from lacq.llama.build import build as run_build


@cli.command(name="build")
@build_options
@click.option("--cuda-arch", default=None, help="CMAKE_CUDA_ARCHITECTURES for --backend cuda (default native).")
@click.option("--target", "targets", multiple=True, help="Extra cmake target to build (e.g. test-backend-ops).")
@click.option("--no-patches", is_flag=True, help="Build the stock tree, without patches/series.")
@click.option("-j", "--jobs", type=int, default=None, help="Parallel build jobs (default: all cores).")
@click.option("--print-path", is_flag=True, help="Print only the bin/ directory of the build (builds if needed).")
@click.option("--print-source", is_flag=True,
              help="Prepare the patched source tree and print its path (for the top-level CMakeLists.txt).")
@handle_errors
def build_cmd(build: BuildChoice, cuda_arch, targets, no_patches, jobs, print_path, print_source):
    """Build the patched llama.cpp tools (cached by source, patches, backend and flags)."""
    spec = BuildSpec(backend=build.backend, cuda_arch=cuda_arch, extra_targets=tuple(targets),
                     patches=not no_patches)
    if print_source:
        click.echo(str(prepared_source(spec, build.source)))
        return
    t0 = time.monotonic()
    existing = find_build(spec, build.source)
    if existing is not None:
        result = existing
    elif print_path:
        result = run_build(spec, build.source, jobs=jobs)
    else:
        with progress_bar() as progress:
            task = progress.add_task(f"build {build.backend}", total=1.0, detail="")
            result = run_build(spec, build.source, jobs=jobs,
                               progress=lambda f, d: progress.update(task, completed=f, detail=d))
    if print_path:
        click.echo(str(result.bin_dir))
        return
    state = "up to date" if existing is not None else "built"
    console.print(f"[green]{state}[/green] {build.backend} build {result.key} in {time.monotonic() - t0:.2f} s")
    console.print(f"  bin: {result.bin_dir}", soft_wrap=True)
    console.print(f"  patches: {', '.join(result.patches) or 'none'}")

