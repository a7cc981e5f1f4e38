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
import hashlib
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


def _first_match(path: str, prefix: str) -> str:
    try:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def describe_machine() -> dict[str, str]:
    """Return the facts about this host that the benchmark page records."""
    memory_kib = _first_match("/proc/meminfo", "MemTotal").split()[0]
    filesystem = subprocess.run(["df", "--output=fstype,source", str(WORK_ROOT)],
                                capture_output=True, text=True, check=False).stdout.split()
    return {
        "cpu": _first_match("/proc/cpuinfo", "model name"),
        "cores": str(os.cpu_count()),
        "memory": f"{int(memory_kib) / 1024 / 1024:.0f} GiB" if memory_kib.isdigit() else "unknown",
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "work_filesystem": " ".join(filesystem[-2:]) if len(filesystem) >= 2 else "unknown",
        "load_average_at_start": " ".join(f"{load:.2f}" for load in os.getloadavg()),
    }


def describe_build() -> dict[str, str]:
    """Return the git commit of this tree and a digest of ``src/``, which names the build."""
    head = subprocess.run(["git", "-C", str(REPOSITORY), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    status = subprocess.run(["git", "-C", str(REPOSITORY), "status", "--porcelain", "--", "src"],
                            capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256()
    for path in sorted((REPOSITORY / "src").rglob("*.py")):
        digest.update(str(path.relative_to(REPOSITORY)).encode())
        digest.update(path.read_bytes())
    return {
        "commit": head or "unknown",
        "src_changes_since_commit": "yes" if status.strip() else "no",
        "src_sha256": digest.hexdigest()[:12],
    }


def _run_quietly(command: list[str], what: str) -> Optional[str]:
    """Run a setup command and return None on success, or the last lines of its output."""
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
    """Create or refresh one venv.

    Returns its interpreter and the import probe's output, or None and the reason that the
    venv cannot be used.
    """
    venv = VENVS / name
    python = venv / "bin" / "python"
    marker = venv / ".bench-requirements"
    requirements = " ".join(UPSTREAM_REQUIREMENTS if name == UPSTREAM else [MODEL_REQUIREMENT])
    if rebuild or not marker.is_file() or marker.read_text() != requirements:
        log(f"setup: creating venv {venv} with {requirements}")
        error = _run_quietly([sys.executable, "-m", "venv", "--clear", str(venv)], "python -m venv")
        error = error or _run_quietly(_pip_install(python, requirements.split()), "pip install")
        if error:
            return None, error
        marker.write_text(requirements)
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
    """Run every selected variant ``rounds`` times and collect the metrics of each run.

    Within a round, all variants of one workload run back to back, so that a comparison
    between variants (such as 32 sessions against 1) pairs runs made close together.
    """
    results: Results = {}
    problems: list[str] = []
    library_sides = [side for side in (UPSTREAM, OURS) if side in pythons]
    floor_python = pythons.get(OURS) or pythons.get(UPSTREAM)
    assert floor_python is not None
    total = len(selection) * rounds * (len(library_sides) + 1)
    done = 0
    workloads = list(dict.fromkeys(workload for workload, _ in selection))
    for workload in workloads:
        variants = [variant for name, variant in selection if name == workload]
        for variant in variants:
            results[(workload, variant)] = {side: [] for side in (UPSTREAM, OURS, FLOOR)}
        for round_index in range(rounds):
            order = library_sides if round_index % 2 == 0 else library_sides[::-1]
            for variant in variants:
                label = f"{workload}/{variant}" if variant else workload
                for side in [*order, FLOOR]:
                    done += 1
                    python = floor_python if side == FLOOR else pythons[side]
                    outcome = run_worker(python, workload, variant, side == FLOOR, quick)
                    where = f"{label} round {round_index + 1} {side}"
                    metrics = _record(outcome, where, problems)
                    log(f"[{done}/{total}] {where}: "
                        + (_describe(metrics) if metrics else f"FAILED {outcome.get('error')}"))
                    results[(workload, variant)][side].append(metrics)
    return results, problems


def _record(outcome: dict[str, Any], where: str, problems: list[str]) -> RoundMetrics:
    """Return the metrics of one worker run, adding its errors and problems to ``problems``."""
    metrics = outcome.get("metrics")
    if "error" in outcome or metrics is None:
        problems.append(f"{where}: {outcome.get('error')}")
        return None
    problems.extend(f"{where}: {problem}" for problem in outcome.get("problems", []))
    return dict(metrics)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds per workload (default 7)")
    parser.add_argument("--only", default="",
                        help="comma-separated workloads, optionally WORKLOAD:VARIANT"
                             f" (workloads: {', '.join(VARIANTS)})")
    parser.add_argument("--quick", action="store_true",
                        help="fewer tasks, lines and bytes, for a smoke run")
    parser.add_argument("--rebuild", action="store_true", help="recreate both venvs")
    parser.add_argument("--report", type=Path, default=None, metavar="RESULTS_JSON",
                        help="print the tables of an earlier run's results file and exit")
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
    requested = [item.strip() for item in only.split(",") if item.strip()]
    selection = []
    for workload, variants in VARIANTS.items():
        for variant in variants:
            if not requested or workload in requested or f"{workload}:{variant}" in requested:
                selection.append((workload, variant))
    known = set(VARIANTS) | {f"{w}:{v}" for w, vs in VARIANTS.items() for v in vs}
    unknown = [item for item in requested if item not in known]
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


def print_report(results: Results, rounds: int, quick: bool, unavailable: dict[str, str],
                 problems: list[str]) -> None:
    log("")
    log(f"## Results: medians of {rounds} rounds{' (--quick sizes)' if quick else ''};"
        " ratios are medians of per-round ratios")
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


def report_saved(path: Path) -> int:
    """Print the tables of a results file written by an earlier run."""
    record = json.loads(path.read_text())
    results: Results = {
        (entry["workload"], entry["variant"]): entry["rounds"] for entry in record["results"]
    }
    log(f"machine: {record.get('machine')}")
    log(f"ours build: {record.get('ours_build')}")
    log(f"venvs: {record.get('venvs')}")
    print_report(results, record["rounds"], record["quick"], record.get("unavailable", {}),
                 record.get("problems", []))
    log(f"\nThat run took {record['elapsed_s'] / 60:.1f} min.")
    return 0


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    if arguments.report is not None:
        return report_saved(arguments.report)
    started = time.perf_counter()
    VENVS.mkdir(exist_ok=True)
    WORK_ROOT.mkdir(exist_ok=True)
    pythons: dict[str, Path] = {}
    unavailable: dict[str, str] = {}
    venv_details: dict[str, str] = {}
    for side in (UPSTREAM, OURS):
        python, detail = prepare_venv(side, arguments.rebuild)
        if python is None:
            unavailable[side] = detail
            log(f"setup: {side} is unavailable and will be skipped: {detail}")
        else:
            pythons[side] = python
            venv_details[side] = detail
            log(f"setup: {side} imports openjd.sessions {detail}")
    if not pythons:
        log("neither venv can import openjd.sessions; nothing to run")
        return 1

    machine, build = describe_machine(), describe_build()
    log("machine: " + ", ".join(f"{key}={value}" for key, value in machine.items()))
    log("ours build: " + ", ".join(f"{key}={value}" for key, value in build.items()))
    results, problems = run_rounds(pythons, arguments.selection, arguments.rounds, arguments.quick)
    elapsed = time.perf_counter() - started
    machine["load_average_at_end"] = " ".join(f"{load:.2f}" for load in os.getloadavg())

    arguments.results.parent.mkdir(parents=True, exist_ok=True)
    serializable = [
        {"workload": w, "variant": v, "rounds": sides} for (w, v), sides in results.items()
    ]
    arguments.results.write_text(json.dumps(
        {"rounds": arguments.rounds, "quick": arguments.quick, "elapsed_s": elapsed,
         "machine": machine, "ours_build": build, "venvs": venv_details,
         "unavailable": unavailable, "problems": problems, "results": serializable}, indent=1))

    print_report(results, arguments.rounds, arguments.quick, unavailable, problems)
    log(f"\nTotal time {elapsed / 60:.1f} min; load average at the end"
        f" {machine['load_average_at_end']}; raw results in {arguments.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
