"""Run the examples with the real openjd-cli 0.7.5 on top of this package.

``openjd run`` is the main client of openjd-sessions, so these tests check drop-in
compatibility end to end. They build a venv with openjd-cli (installed without its
dependencies, so pip cannot pull the upstream openjd-sessions), its other runtime
dependencies, and this package from the repository. The third-party part is cached in
``.pytest-venvs/`` at the repository root. This package is reinstalled once per test
session, so the venv always runs the current source. Without access to a package index
the tests are skipped.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import venv
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

# The venv lock uses flock, and the examples use POSIX signals.
fcntl = pytest.importorskip("fcntl", reason="the openjd-cli tests need a POSIX host")

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
CLI_VERSION = "0.7.5"

# openjd-cli 0.7.5 imports openjd.model, openjd.sessions and yaml at runtime. Its METADATA
# lists only openjd-model and openjd-sessions, because pyyaml arrives through openjd-model.
CLI_RUNTIME_DEPENDENCIES = ("openjd-model >= 0.9, < 0.10", "pyyaml >= 6")

# Generous limits that only guard against hangs.
PIP_TIMEOUT_SECONDS = 600
RUN_TIMEOUT_SECONDS = 180

pytestmark = pytest.mark.slow


class CliVenv:
    """A venv with openjd-cli and this package installed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = root / "bin" / "python"
        self.openjd = root / "bin" / "openjd"

    def pip(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.python), "-m", "pip", "--disable-pip-version-check", *args],
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT_SECONDS,
            env=_clean_environment(),
        )


def _clean_environment() -> dict[str, str]:
    """Return this process's environment without variables that would redirect imports."""
    environment = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):
        environment.pop(name, None)
    return environment


def _tail(result: subprocess.CompletedProcess[str], lines: int = 15) -> str:
    return "\n".join((result.stdout + result.stderr).splitlines()[-lines:])


def _build_third_party_venv(root: Path) -> None:
    """Create the venv at ``root`` with openjd-cli and its dependencies, or skip the tests.

    Console scripts hold the venv's absolute path, so the venv is built in place and
    ``ready.json`` marks it complete.
    """
    venv.EnvBuilder(with_pip=True, clear=True, symlinks=True).create(root)
    cli_venv = CliVenv(root)

    steps: list[Sequence[str]] = [
        ["install", *CLI_RUNTIME_DEPENDENCIES],
        ["install", "--no-deps", f"openjd-cli=={CLI_VERSION}"],
    ]
    for step in steps:
        result = cli_venv.pip(*step)
        if result.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip(
                f"cannot build the openjd-cli venv because pip {' '.join(step)} failed "
                f"(no package index reachable?):\n{_tail(result, 3)}"
            )

    (root / "ready.json").write_text(json.dumps({"openjd-cli": CLI_VERSION}))


@pytest.fixture(scope="session")
def cli_venv() -> Iterator[CliVenv]:
    """The cached openjd-cli venv, with this package freshly installed for the session.

    A lock file keeps two test runs from building or reinstalling the venv at once.
    """
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    root = REPO_ROOT / ".pytest-venvs" / f"openjd-cli-{CLI_VERSION}-{tag}"
    root.parent.mkdir(exist_ok=True)

    with open(root.parent / f"{root.name}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if not (root / "ready.json").is_file():
            _build_third_party_venv(root)
        cli_venv = CliVenv(root)
        result = cli_venv.pip("install", "--no-deps", "--force-reinstall", str(REPO_ROOT))
        if result.returncode != 0:
            pytest.fail(f"pip install {REPO_ROOT} failed:\n{_tail(result, 40)}")
        yield cli_venv


def run_openjd(
    cli_venv: CliVenv, template: Path, *args: str, cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Run ``openjd run TEMPLATE ARGS`` and return its combined output."""
    return subprocess.run(
        [str(cli_venv.openjd), "run", str(template), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        timeout=RUN_TIMEOUT_SECONDS,
        env=_clean_environment(),
    )


def test_cli_venv_uses_this_package(cli_venv: CliVenv) -> None:
    script = (
        "import importlib.metadata, json, openjd.sessions\n"
        "dist = importlib.metadata.distribution('openjd-sessions')\n"
        "print(json.dumps({'file': openjd.sessions.__file__, 'version': dist.version,\n"
        "                  'direct_url': dist.read_text('direct_url.json')}))\n"
    )
    result = subprocess.run(
        [str(cli_venv.python), "-c", script],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        env=_clean_environment(),
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)

    assert found["version"] == "0.10.8"
    assert Path(found["file"]).is_relative_to(cli_venv.root)
    assert REPO_ROOT.as_uri() in (found["direct_url"] or "")


def test_cli_venv_dependencies_consistent(cli_venv: CliVenv) -> None:
    result = cli_venv.pip("check")

    assert result.returncode == 0, _tail(result)


def test_render_example_all_steps(cli_venv: CliVenv, tmp_path: Path, python_exe: str) -> None:
    output_dir = tmp_path / "frames"
    result = run_openjd(
        cli_venv,
        EXAMPLES / "render" / "job.yaml",
        "-p", f"Python={python_exe}",
        "-p", f"OutputDir={output_dir}",
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout
    assert "Session ended successfully" in result.stdout
    assert "Chunks run: 11" in result.stdout
    assert "Setting: RENDER_WIDTH=64" in result.stdout
    assert "openjd_env: RENDER_OUTPUT_DIR=" in result.stdout
    assert "openjd_status: Frame 8 written to" in result.stdout
    assert "8 frames and 3 clips in" in result.stdout

    frames = sorted(path.name for path in output_dir.glob("frame_*.ppm"))
    assert frames == [f"frame_{frame:04d}.ppm" for frame in range(1, 9)]
    clips = sorted(path.name for path in output_dir.glob("clip_*.ppm.gz"))
    assert clips == ["clip_0001-0003.ppm.gz", "clip_0004-0006.ppm.gz", "clip_0007-0008.ppm.gz"]

    expected_clip = b"".join((output_dir / f"frame_{frame:04d}.ppm").read_bytes() for frame in (7, 8))
    assert gzip.decompress((output_dir / "clip_0007-0008.ppm.gz").read_bytes()) == expected_clip


def test_render_encode_without_frames_fails(
    cli_venv: CliVenv, tmp_path: Path, python_exe: str
) -> None:
    result = run_openjd(
        cli_venv,
        EXAMPLES / "render" / "job.yaml",
        "--step", "Encode",
        "--no-run-dependencies",
        "-p", f"Python={python_exe}",
        "-p", f"OutputDir={tmp_path}",
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 1, result.stdout
    assert "Session ended with errors" in result.stdout
    assert "openjd_fail: Frame not found:" in result.stdout
    assert list(tmp_path.glob("clip_*")) == []


def test_render_encode_one_chunk(cli_venv: CliVenv, tmp_path: Path, python_exe: str) -> None:
    result = run_openjd(
        cli_venv,
        EXAMPLES / "render" / "job.yaml",
        "--step", "Encode",
        "--run-dependencies",
        "--task-param", "Frames=2-5",
        "-p", f"Python={python_exe}",
        "-p", f"OutputDir={tmp_path}",
        "-p", "FrameRange=1-6",
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout
    assert "Frames(CHUNK[INT]) = 2-5" in result.stdout
    assert sorted(path.name for path in tmp_path.glob("clip_*")) == ["clip_0002-0005.ppm.gz"]
    assert len(list(tmp_path.glob("frame_*.ppm"))) == 6


CANCEL_PARAMETERS = ("-p", "TimeoutSeconds=1", "-p", "NotifyPeriodSeconds=2")


def test_cancel_finishes_in_time(cli_venv: CliVenv, tmp_path: Path, python_exe: str) -> None:
    result = run_openjd(
        cli_venv,
        EXAMPLES / "cancel" / "job.yaml",
        "--step", "FinishesInTime",
        "-p", f"Python={python_exe}",
        *CANCEL_PARAMETERS,
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout
    assert "Finished well before the time limit" in result.stdout
    assert "TIMEOUT" not in result.stdout


def test_cancel_times_out_terminated(cli_venv: CliVenv, tmp_path: Path, python_exe: str) -> None:
    result = run_openjd(
        cli_venv,
        EXAMPLES / "cancel" / "job.yaml",
        "--step", "TimesOut",
        "-p", f"Python={python_exe}",
        *CANCEL_PARAMETERS,
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 1, result.stdout
    assert "TIMEOUT - Runtime limit reached at" in result.stdout
    assert "via termination method" in result.stdout
    assert re.search(r"exited with code: -9 ", result.stdout), result.stdout


def test_cancel_graceful_stop_reads_deadline(
    cli_venv: CliVenv, tmp_path: Path, python_exe: str
) -> None:
    result = run_openjd(
        cli_venv,
        EXAMPLES / "cancel" / "job.yaml",
        "--step", "StopsGracefully",
        "-p", f"Python={python_exe}",
        *CANCEL_PARAMETERS,
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 1, result.stdout
    assert "TIMEOUT - Runtime limit reached at" in result.stdout
    assert "via notify then terminate method" in result.stdout
    deadline = re.search(r"The session kills this process at (\S+)", result.stdout)
    assert deadline is not None, result.stdout
    assert f"Grace period ends at {deadline.group(1)}" in result.stdout
    assert "openjd_status: Checkpoint saved to" in result.stdout
    assert re.search(r"exited with code: 0 ", result.stdout), result.stdout


def test_cancel_ignored_notice_killed(cli_venv: CliVenv, tmp_path: Path, python_exe: str) -> None:
    result = run_openjd(
        cli_venv,
        EXAMPLES / "cancel" / "job.yaml",
        "--step", "IgnoresNotice",
        "-p", f"Python={python_exe}",
        *CANCEL_PARAMETERS,
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 1, result.stdout
    assert "Received SIGTERM, ignoring it and working on" in result.stdout
    assert "Notify period ended. Terminate at" in result.stdout
    assert re.search(r"exited with code: -9 ", result.stdout), result.stdout


def test_cancel_all_steps_stop_at_first(
    cli_venv: CliVenv, tmp_path: Path, python_exe: str
) -> None:
    result = run_openjd(
        cli_venv,
        EXAMPLES / "cancel" / "job.yaml",
        "-p", f"Python={python_exe}",
        *CANCEL_PARAMETERS,
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 1, result.stdout
    assert "Running step 'FinishesInTime'" in result.stdout
    assert "Running step 'TimesOut'" in result.stdout
    assert "Running step 'StopsGracefully'" not in result.stdout


def test_cli_interrupt_cancels_task(cli_venv: CliVenv, tmp_path: Path, python_exe: str) -> None:
    log_path = tmp_path / "openjd.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [
                str(cli_venv.openjd), "run", str(EXAMPLES / "cancel" / "job.yaml"),
                "--step", "IgnoresNotice",
                "-p", f"Python={python_exe}",
                "-p", "TimeoutSeconds=600",
                "-p", "NotifyPeriodSeconds=1",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=_clean_environment(),
        )  # fmt: skip
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
            while "Working for 10 minutes" not in log_path.read_text():
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "the task did not start"
                time.sleep(0.1)

            process.send_signal(signal.SIGINT)
            returncode = process.wait(timeout=RUN_TIMEOUT_SECONDS)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    output = log_path.read_text()

    assert returncode == 1, output
    assert "Received SIGTERM, ignoring it and working on" in output
    assert "TIMEOUT" not in output
    assert re.search(r"exited with code: -9 ", output), output
