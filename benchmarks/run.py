"""Compare this package with upstream openjd-sessions 0.10.8 and a standard-library floor.

Builds two throwaway venvs under ``benchmarks/.venvs/`` (``upstream``: openjd-sessions
0.10.8 and openjd-model 0.9.0 from PyPI; ``ours``: openjd-model 0.9.0 and a non-editable
install of this repository), then runs every workload variant for ``--rounds`` rounds.
Each round runs upstream and ours in alternating order (A B floor, then B A floor, ...),
one worker process per run, and the floor with the same interpreter. It prints the
medians, the paired ratios ours/upstream and ours/floor, and a PASS/MISS verdict for each
target. Only the standard library is used here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]
sys.path.append(str(HERE))

from _bench_config import VARIANTS  # noqa: E402
from _bench_report import (  # noqa: E402
    FLOOR,
    OURS,
    UPSTREAM,
    Results,
    RoundMetrics,
    paired_ratio,
    results_table,
    targets_table,
)

REPOSITORY = HERE.parent
VENVS = HERE / ".venvs"
WORK_ROOT = HERE / ".work"
RESULTS_FILE = HERE / ".results" / "latest.json"
MODEL_REQUIREMENT = "openjd-model==0.9.0"
UPSTREAM_REQUIREMENTS = ["openjd-sessions==0.10.8", MODEL_REQUIREMENT]
# A worker that runs longer than this is stopped and its round counts as failed.
WORKER_TIMEOUT_S = 1800


def log(message: str) -> None:
    print(message, flush=True)


def _run_quietly(command: list[str], what: str) -> Optional[str]:
    """Run a setup command; return None on success, else the last lines of its output."""
    completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, check=False)
    if completed.returncode == 0:
        return None
    tail = "\n    ".join(completed.stdout.strip().splitlines()[-8:])
    return f"{what} failed with exit code {completed.returncode}:\n    {tail}"


def _pip_install(python: Path, requirements: list[str]) -> list[str]:
    return [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            *requirements]


def prepare_venv(name: str, rebuild: bool) -> tuple[Optional[Path], str]:
    """Create or refresh one venv; return its python, or None and the reason it is unusable."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    marker = venv / ".bench-requirements"
    wanted = " ".join(UPSTREAM_REQUIREMENTS if name == UPSTREAM else [MODEL_REQUIREMENT])
    if rebuild or not marker.is_file() or marker.read_text() != wanted:
        log(f"setup: creating venv {venv} with {wanted}")
        error = _run_quietly([sys.executable, "-m", "venv", "--clear", str(venv)], "python -m venv")
        error = error or _run_quietly(_pip_install(python, wanted.split()), "pip install")
        if error:
            return None, error
        marker.write_text(wanted)
    if name == OURS:
        # Non-editable, so the worker imports what a user would install from this tree.
        log(f"setup: installing {REPOSITORY} into {venv}")
        command = _pip_install(python, ["--no-deps", "--force-reinstall", str(REPOSITORY)])
        error = _run_quietly(command, f"pip install {REPOSITORY}")
        if error:
            return None, error
    probe = "import openjd.sessions as s; s.Session; print(s.version, s.__file__)"
    completed = subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
                               check=False)
    if completed.returncode != 0:
        last = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"import openjd.sessions failed: {last}"
    return python, completed.stdout.strip()


def run_worker(python: Path, workload: str, variant: str, floor: bool,
               quick: bool) -> dict[str, Any]:
    command = [str(python), str(HERE / "workloads.py"), workload, "--variant", variant,
               "--root", str(WORK_ROOT), "--json"]
    if floor:
        command.append("--floor")
    if quick:
        command.append("--quick")
    try:
        completed = subprocess.run(command, capture_output=True, text=True, check=False,
                                   timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {WORKER_TIMEOUT_S} s"}
    lines = completed.stdout.strip().splitlines()
    try:
        return dict(json.loads(lines[-1]))
    except (IndexError, ValueError):
        stderr_tail = " | ".join(completed.stderr.strip().splitlines()[-3:])
        return {"error": f"worker exited {completed.returncode} without a result: {stderr_tail}"}


def _describe(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in metrics.items())


def run_rounds(pythons: dict[str, Path], selection: list[tuple[str, str]], rounds: int,
               quick: bool) -> tuple[Results, list[str]]:
    results: Results = {}
    problems: list[str] = []
    library_sides = [side for side in (UPSTREAM, OURS) if side in pythons]
    floor_python = pythons.get(OURS) or pythons.get(UPSTREAM)
    total = len(selection) * rounds * (len(library_sides) + 1)
    done = 0
    for workload, variant in selection:
        sides: dict[str, list[RoundMetrics]] = {side: [] for side in (UPSTREAM, OURS, FLOOR)}
        results[(workload, variant)] = sides
        label = f"{workload}/{variant}" if variant else workload
        for round_index in range(rounds):
            order = library_sides if round_index % 2 == 0 else library_sides[::-1]
            for side in [*order, FLOOR]:
                done += 1
                python = floor_python if side == FLOOR else pythons[side]
                assert python is not None
                outcome = run_worker(python, workload, variant, side == FLOOR, quick)
                metrics = outcome.get("metrics")
                prefix = f"[{done}/{total}] {label} round {round_index + 1} {side}"
                if "error" in outcome or metrics is None:
                    log(f"{prefix}: FAILED {outcome.get('error')}")
                    problems.append(f"{label} {side} round {round_index + 1}: {outcome.get('error')}")
                    sides[side].append(None)
                    continue
                for problem in outcome.get("problems", []):
                    problems.append(f"{label} {side} round {round_index + 1}: {problem}")
                log(f"{prefix}: {_describe(metrics)}")
                sides[side].append(metrics)
    return results, problems


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds per workload (default 7)")
    parser.add_argument("--only", default="",
                        help="comma-separated workloads, optionally WORKLOAD:VARIANT"
                             f" (workloads: {', '.join(VARIANTS)})")
    parser.add_argument("--quick", action="store_true",
                        help="fewer tasks, lines and bytes, for a smoke run")
    parser.add_argument("--rebuild", action="store_true", help="recreate both venvs")
    parser.add_argument("--results", type=Path, default=RESULTS_FILE,
                        help=f"where to write the raw per-round results (default {RESULTS_FILE})")
    arguments = parser.parse_args(argv)
    if arguments.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {arguments.rounds}")
    try:
        arguments.selection = select(arguments.only)
    except ValueError as exc:
        parser.error(str(exc))
    return arguments


def select(only: str) -> list[tuple[str, str]]:
    """Return the (workload, variant) pairs that ``--only`` names, in the registry's order."""
    wanted = [item.strip() for item in only.split(",") if item.strip()]
    selection = []
    for workload, variants in VARIANTS.items():
        for variant in variants:
            if not wanted or workload in wanted or f"{workload}:{variant}" in wanted:
                selection.append((workload, variant))
    known = set(VARIANTS) | {f"{w}:{v}" for w, vs in VARIANTS.items() for v in vs}
    unknown = [item for item in wanted if item not in known]
    if unknown:
        raise ValueError(f"--only names unknown workloads {unknown}; known: {sorted(known)}")
    return selection


def scaling_summary(results: Results) -> str:
    lines = []
    for side in (UPSTREAM, OURS, FLOOR):
        many = results.get(("concurrency", "32"), {}).get(side, [])
        one = results.get(("concurrency", "1"), {}).get(side, [])
        ratio = paired_ratio(many, one, "cpu_us_per_line")
        if ratio is not None:
            lines.append(f"- {side}: CPU per line with 32 sessions = {ratio:.2f}x that of 1 session")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    started = time.perf_counter()
    VENVS.mkdir(exist_ok=True)
    WORK_ROOT.mkdir(exist_ok=True)
    pythons: dict[str, Path] = {}
    unavailable: dict[str, str] = {}
    for side in (UPSTREAM, OURS):
        python, detail = prepare_venv(side, arguments.rebuild)
        if python is None:
            unavailable[side] = detail
            log(f"setup: {side} is unavailable and will be skipped: {detail}")
        else:
            pythons[side] = python
            log(f"setup: {side} imports openjd.sessions {detail}")
    if not pythons:
        log("neither venv can import openjd.sessions; nothing to run")
        return 1

    results, problems = run_rounds(pythons, arguments.selection, arguments.rounds, arguments.quick)
    elapsed = time.perf_counter() - started

    arguments.results.parent.mkdir(parents=True, exist_ok=True)
    serializable = [
        {"workload": w, "variant": v, "rounds": sides} for (w, v), sides in results.items()
    ]
    arguments.results.write_text(json.dumps(
        {"rounds": arguments.rounds, "quick": arguments.quick, "elapsed_s": elapsed,
         "unavailable": unavailable, "results": serializable}, indent=1))

    log("")
    log(f"## Results: medians of {arguments.rounds} rounds"
        f"{' (--quick sizes)' if arguments.quick else ''}; ratios are medians of per-round ratios")
    log("")
    log(results_table(results))
    scaling = scaling_summary(results)
    if scaling:
        log("")
        log(scaling)
    log("")
    log("## Targets")
    log("")
    log(targets_table(results))
    for side, reason in unavailable.items():
        log(f"\nNOTE: {side} was not run: {reason}")
    if problems:
        log("\nProblems reported by workers:")
        for problem in problems:
            log(f"- {problem}")
    log(f"\nTotal time {elapsed / 60:.1f} min; raw results in {arguments.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
