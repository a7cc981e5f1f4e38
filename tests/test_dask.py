"""Run one job on a Dask cluster with ``openjd-sessions run --cluster`` and ``--scheduler-file``.

The module starts one local cluster of two single-threaded worker processes on
127.0.0.1 and runs the scenarios of ``test_workers.py`` against it. Separate tests cover
``--cluster local:N``, which starts a cluster of its own, and a worker killed mid-task.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_workers import (
    check_cancel_while_tasks_run,
    check_each_task_runs_once,
    check_environments_once_per_worker,
    check_failing_task_stops_job,
    check_failure_cancels_running,
    check_render_matches_single_session,
    check_step_waits_for_dependency,
    finish_runner,
    is_running,
    linux_only,
    posix_only,
    start_runner,
    wait_until,
)

distributed = pytest.importorskip(
    "distributed", reason="needs Dask distributed, the dask extra: pip install 'openjd-sessions[dask]'"
)

WORKER_COUNT = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A cluster of two single-threaded worker processes on loopback, shared by this module."""
    local_cluster = distributed.LocalCluster(
        n_workers=WORKER_COUNT,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        worker_dashboard_address="127.0.0.1:0",
    )
    client = distributed.Client(local_cluster)
    try:
        yield local_cluster, client
    finally:
        client.close()
        local_cluster.close()


@pytest.fixture
def cluster_args(cluster: Any) -> list[str]:
    """``--cluster ADDRESS`` of the module's cluster, once both workers are up again."""
    local_cluster, client = cluster
    client.wait_for_workers(WORKER_COUNT, timeout=90)
    return ["--cluster", local_cluster.scheduler_address]


def test_dask_runs_each_task_once(cluster_args: list[str], tmp_path: Path) -> None:
    run = check_each_task_runs_once(cluster_args, tmp_path)
    assert len(run.result["workers"]) == WORKER_COUNT
    assert all(worker.startswith("tcp://127.0.0.1:") for worker in run.result["workers"])


def test_dask_scheduler_file_option(cluster: Any, cluster_args: list[str], tmp_path: Path) -> None:
    local_cluster, _ = cluster
    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text(json.dumps({"address": local_cluster.scheduler_address}), encoding="utf-8")

    check_each_task_runs_once(["--scheduler-file", str(scheduler_file)], tmp_path)


def test_dask_enters_environments_once(cluster_args: list[str], tmp_path: Path) -> None:
    run = check_environments_once_per_worker(cluster_args, tmp_path)
    # A worker opens its Session on its first task, and closes it after the last task of the job.
    last_task = max(index for index, event in enumerate(run.events) if event in run.final_tasks())
    assert min(run.log_indexes("EXIT-STEP") + run.log_indexes("EXIT-JOB")) > last_task


def test_dask_respects_step_dependencies(cluster_args: list[str], tmp_path: Path) -> None:
    check_step_waits_for_dependency(cluster_args, tmp_path)


def test_dask_failing_task_stops_job(cluster_args: list[str], tmp_path: Path) -> None:
    check_failing_task_stops_job(cluster_args, tmp_path)


def test_dask_failure_cancels_running(cluster_args: list[str], tmp_path: Path) -> None:
    check_failure_cancels_running(cluster_args, tmp_path)


@posix_only
def test_dask_cancel_while_running(cluster_args: list[str], tmp_path: Path) -> None:
    check_cancel_while_tasks_run(cluster_args, tmp_path)


HANGS_ONCE = """
import os
import subprocess
import sys
import time

number = int(sys.argv[1])
attempts = sys.argv[2]
if number == 6:
    first_attempt = not os.path.exists(attempts)
    with open(attempts, "a", encoding="utf-8") as file:
        file.write("attempt\\n")
    if first_attempt:
        # A descendant in a session of its own must die with the worker.
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
        print("GRANDCHILD", child.pid, flush=True)
        time.sleep(300)
time.sleep(0.2)
print("TASK-DONE", number, flush=True)
"""


def _script_job(tmp_path: Path, script: str, count: int, *extra_args: str) -> Path:
    step = {
        "name": "Work",
        "parameterSpace": {"taskParameterDefinitions": [{"name": "N", "type": "INT", "range": f"1-{count}"}]},
        "script": {
            "actions": {
                "onRun": {"command": sys.executable, "args": ["{{Task.File.Script}}", "{{Task.Param.N}}", *extra_args]}
            },
            "embeddedFiles": [{"name": "Script", "type": "TEXT", "data": script}],
        },
    }
    template = {"specificationVersion": "jobtemplate-2023-09", "name": "DaskTest", "steps": [step]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(template), encoding="utf-8")
    return path


@linux_only
def test_dask_killed_worker_task_reruns(cluster_args: list[str], tmp_path: Path) -> None:
    attempts = tmp_path / "attempts.txt"
    path = _script_job(tmp_path, HANGS_ONCE, 6, str(attempts))

    process, reader = start_runner([str(path), *cluster_args], tmp_path)
    line = reader.wait_for("GRANDCHILD")[0]
    event = json.loads(line)
    grandchild = int(event["message"].split()[1])
    sessions = [json.loads(text) for text in reader.lines if '"type": "session"' in text]
    worker_pid = next(item["pid"] for item in sessions if item["worker"] == event["worker"])
    os.kill(worker_pid, signal.SIGKILL)
    run = finish_runner(process, reader)

    assert run.returncode == 0, run.describe()
    assert attempts.read_text(encoding="utf-8").count("attempt") == 2
    assert wait_until(lambda: not is_running(grandchild)), f"process {grandchild} outlived its killed worker"
    for number in range(1, 7):
        assert len(run.log_indexes(f"TASK-DONE {number}")) == 1, number
    assert run.step_counts("Work") == {"succeeded": 6, "failed": 0, "canceled": 0, "not_run": 0}
    assert run.result["task_reruns"] == 1
    warnings = [item["message"] for item in run.events if item["type"] == "log" and item["level"] == "WARNING"]
    assert any(f"Worker {event['worker']} was lost while running task Work:5" in text for text in warnings)
    assert any("Task Work:5 started again on worker" in text for text in warnings)


LISTENERS = """
import os
import socket
import struct

# Listening TCP sockets of this network namespace by inode, from /proc/net/tcp and tcp6.
sockets = {}
for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
    with open(f"/proc/net/{name}", encoding="ascii") as table:
        for line in table.read().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":
                continue
            address, port = fields[1].split(":")
            words = [int(address[i : i + 8], 16) for i in range(0, len(address), 8)]
            packed = b"".join(struct.pack("<I", word) for word in words)
            sockets[fields[9]] = f"{socket.inet_ntop(family, packed)}:{int(port, 16)}"
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        continue
    for descriptor in descriptors:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{descriptor}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in sockets:
            print("LISTEN", pid, sockets[target[8:-1]], flush=True)
"""


@linux_only
def test_dask_local_cluster_loopback_only(tmp_path: Path) -> None:
    path = _script_job(tmp_path, LISTENERS, 1)

    process, reader = start_runner([str(path), "--cluster", "local:2"], tmp_path)
    run = finish_runner(process, reader)

    assert run.returncode == 0, run.describe()
    own_pids = {str(process.pid), *(str(pid) for pid in run.worker_pids().values())}
    listeners = [
        item["message"].split()[1:]
        for item in run.events
        if item["type"] == "log" and item["message"].startswith("LISTEN ")
    ]
    addresses = [address for pid, address in listeners if pid in own_pids]
    assert any(pid == str(process.pid) for pid, _ in listeners), listeners
    assert addresses
    assert all(address.startswith("127.0.0.1:") for address in addresses), addresses


@pytest.mark.slow
def test_dask_local_render_matches_single(tmp_path: Path) -> None:
    check_render_matches_single_session(["--cluster", "local:2"], tmp_path)
