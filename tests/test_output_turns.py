"""Output batches of concurrent sessions take turns, and a blocked one does not stop the rest."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import HANG_GUARD_SECONDS, CallbackRecorder, LogCollector, SessionFactory, python_step, session_id_of

from openjd.sessions import LOG, ActionState

pytestmark = pytest.mark.skipif(os.name != "posix", reason="runs POSIX processes")


@pytest.fixture
def make_session(tmp_path: Path) -> Iterator[SessionFactory]:
    factory = SessionFactory(tmp_path)
    yield factory
    factory.close()


class BlockingFilter(logging.Filter):
    """Blocks the thread that logs ``line`` for one session until ``release`` is set."""

    def __init__(self, line: str) -> None:
        super().__init__()
        self.line = line
        self.session_id = ""
        self.blocked = threading.Event()
        self.release = threading.Event()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "session_id", None) == self.session_id and record.getMessage() == self.line:
            self.blocked.set()
            self.release.wait(2 * HANG_GUARD_SECONDS)
        return True


def test_blocked_output_leaves_others_running(make_session: SessionFactory) -> None:
    blocker = BlockingFilter("block-here")
    LOG.addFilter(blocker)
    try:
        blocked_recorder, other_recorder = CallbackRecorder(), CallbackRecorder()
        blocked_session = make_session(callback=blocked_recorder)
        blocker.session_id = session_id_of(blocked_session)
        blocked_session.run_task(step_script=python_step("print('block-here', flush=True)"), task_parameter_values={})
        assert blocker.blocked.wait(HANG_GUARD_SECONDS)

        other = make_session(callback=other_recorder)
        with LogCollector().attached() as logs:
            other.run_task(step_script=python_step("print('other-1'); print('other-2')"), task_parameter_values={})
            status = other_recorder.wait_final()
            still_blocked = not blocker.release.is_set()
    finally:
        blocker.release.set()
        LOG.removeFilter(blocker)

    assert status.state == ActionState.SUCCESS
    assert still_blocked
    assert ["other-1", "other-2"] == [m for m in logs.messages(session_id_of(other)) if m.startswith("other-")]
    assert blocked_recorder.wait_final().state == ActionState.SUCCESS
