"""Output records built from a template: the same attributes as the standard library's.

``SessionLogger.output`` copies most attributes of an output record from a template and
computes the rest itself. Each test here compares such a record with the record that the
standard ``LogRecord`` class builds for the same call, through a pass-through record
factory, which makes the library take its ``Logger.makeRecord`` path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import pytest
from helpers import CallbackRecorder, LogCollector, SessionFactory, environment, python_action, session_id_of
from openjd.model import RevisionExtensions, SpecificationRevision

from openjd.sessions import LOG, ActionState, LogContent
from openjd.sessions._logging import SessionLogger

TIME_FIELDS = ("created", "msecs", "relativeCreated")
REDACTION = RevisionExtensions(spec_rev=SpecificationRevision.v2023_09, supported_extensions=["REDACTED_ENV_VARS"])


class RecordList(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def captured_records() -> Iterator[list[logging.LogRecord]]:
    handler = RecordList()
    LOG.addHandler(handler)
    try:
        yield handler.records
    finally:
        LOG.removeHandler(handler)


@contextmanager
def record_factory(factory: Callable[..., logging.LogRecord]) -> Iterator[None]:
    previous = logging.getLogRecordFactory()
    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)


def pass_through_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    return logging.LogRecord(*args, **kwargs)


def warm_logger(session_id: str = "records") -> SessionLogger:
    """Return a logger whose output template exists, so its next output record uses it."""
    logger = SessionLogger(session_id)
    with captured_records():
        logger.output("warm-up")
    assert logger._output_template is not None
    return logger


def template_and_stock_records(logger: SessionLogger, line: str) -> tuple[logging.LogRecord, logging.LogRecord]:
    """Log ``line`` twice: from the template, then through the standard LogRecord class."""
    with captured_records() as records:
        logger.output(line)
        with record_factory(pass_through_factory):
            logger.output(line)
    assert len(records) == 2
    return records[0], records[1]


def record_differences(built: logging.LogRecord, stock: logging.LogRecord) -> list[str]:
    """Describe every way ``built`` differs from ``stock``. An empty list means none.

    The time attributes may differ by the time between the two calls, but each must have
    the type, and follow the rule, of the running Python's ``LogRecord.__init__``.
    """
    problems = []
    if type(built) is not logging.LogRecord:
        problems.append(f"type {type(built).__name__}, expected LogRecord")
    built_fields, stock_fields = vars(built), vars(stock)
    if list(built_fields) != list(stock_fields):
        problems.append(f"attribute names {list(built_fields)}, expected {list(stock_fields)}")
    for name, value in stock_fields.items():
        if name in TIME_FIELDS or name not in built_fields:
            continue
        if built_fields[name] != value or type(built_fields[name]) is not type(value):
            problems.append(f"{name}={built_fields[name]!r}, expected {value!r}")

    for name in TIME_FIELDS:
        if type(built_fields.get(name)) is not type(stock_fields[name]):
            problems.append(f"{name} has type {type(built_fields.get(name)).__name__}")
    if problems:
        return problems
    if not 0.0 <= stock.created - built.created < 5.0:
        problems.append(f"created {built.created} is not shortly before {stock.created}")
    # created and relativeCreated come from one clock reading, so they move together.
    offset = (stock.relativeCreated - built.relativeCreated) - (stock.created - built.created) * 1000
    if abs(offset) > 0.01:
        problems.append(f"relativeCreated is off by {offset} ms")
    if not 0.0 <= built.msecs < 1000.0 or built.msecs.is_integer() != stock.msecs.is_integer():
        problems.append(f"msecs {built.msecs} does not follow the rule of {stock.msecs}")
    elif sys.version_info < (3, 13):
        fraction_ms = (built.created - int(built.created)) * 1000
        expected = int(fraction_ms) + 0.0 if stock.msecs.is_integer() else fraction_ms
        if built.msecs != expected:
            problems.append(f"msecs {built.msecs}, expected {expected} from created")
    return problems


def test_template_record_matches_stdlib() -> None:
    logger = warm_logger()

    built, stock = template_and_stock_records(logger, "plain output line")

    assert record_differences(built, stock) == []
    assert built.getMessage() == "plain output line"
    assert vars(built)["session_id"] == "records"
    assert vars(built)["openjd_log_content"] == LogContent.COMMAND_OUTPUT
    assert built.thread == threading.get_ident()
    assert built.process == os.getpid()


def test_template_record_on_other_thread() -> None:
    logger = warm_logger()
    results: list[tuple[logging.LogRecord, logging.LogRecord]] = []

    thread = threading.Thread(
        target=lambda: results.append(template_and_stock_records(logger, "from a thread")),
        name="record-maker",
    )
    thread.start()
    thread.join(timeout=60)

    assert not thread.is_alive()
    built, stock = results[0]
    assert record_differences(built, stock) == []
    assert built.threadName == "record-maker"
    assert built.thread == thread.ident


def test_template_record_renamed_thread() -> None:
    logger = warm_logger()
    current = threading.current_thread()
    original_name = current.name

    current.name = "renamed-for-test"
    try:
        built, stock = template_and_stock_records(logger, "after rename")
    finally:
        current.name = original_name

    assert record_differences(built, stock) == []
    assert built.threadName == "renamed-for-test"


def test_custom_factory_receives_every_record() -> None:
    logger = warm_logger()

    class CustomRecord(logging.LogRecord):
        pass

    calls: list[str] = []

    def custom_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = CustomRecord(*args, **kwargs)
        calls.append(record.getMessage())
        return record

    with captured_records() as records, record_factory(custom_factory):
        for index in range(5):
            logger.output(f"line {index}")

    assert calls == [f"line {index}" for index in range(5)]
    assert [type(record) for record in records] == [CustomRecord] * 5


def test_patched_make_record_receives_every_record() -> None:
    logger = warm_logger()
    stock_make_record = LOG.makeRecord
    calls: list[object] = []

    def counting_make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        calls.append(args[4])
        return stock_make_record(*args, **kwargs)

    # Not monkeypatch: its undo can leave a bound method in the instance's __dict__.
    LOG.makeRecord = counting_make_record  # type: ignore[method-assign]
    try:
        with captured_records() as records:
            for index in range(3):
                logger.output(f"line {index}")
    finally:
        delattr(LOG, "makeRecord")

    assert calls == ["line 0", "line 1", "line 2"]
    assert [record.msg for record in records] == ["line 0", "line 1", "line 2"]


def test_logger_subclass_receives_every_record(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = warm_logger()
    calls: list[object] = []

    class CountingLogger(logging.Logger):
        def makeRecord(self, *args: Any, **kwargs: Any) -> logging.LogRecord:  # noqa: N802 - overrides logging
            calls.append(args[4])
            return super().makeRecord(*args, **kwargs)

    monkeypatch.setattr(LOG, "__class__", CountingLogger)
    with captured_records() as records:
        logger.output("through the subclass")

    assert calls == ["through the subclass"]
    assert len(records) == 1


def test_template_record_follows_logging_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = warm_logger()
    monkeypatch.setattr(logging, "logThreads", False)
    monkeypatch.setattr(logging, "logProcesses", False)
    monkeypatch.setattr(logging, "logMultiprocessing", False)
    if hasattr(logging, "logAsyncioTasks"):
        monkeypatch.setattr(logging, "logAsyncioTasks", False)

    built, stock = template_and_stock_records(logger, "switches off")

    assert record_differences(built, stock) == []
    assert built.thread is None
    assert built.threadName is None
    assert built.process is None
    assert built.processName is None


def test_template_record_renamed_level() -> None:
    logger = warm_logger()

    logging.addLevelName(logging.INFO, "NOTICE")
    try:
        built, stock = template_and_stock_records(logger, "renamed level")
    finally:
        logging.addLevelName(logging.INFO, "INFO")

    assert record_differences(built, stock) == []
    assert built.levelname == "NOTICE"


def test_template_record_process_name() -> None:
    logger = warm_logger()
    process = multiprocessing.current_process()
    original_name = process.name

    process.name = "renamed-process"
    try:
        built, stock = template_and_stock_records(logger, "renamed process")
    finally:
        process.name = original_name

    assert record_differences(built, stock) == []
    assert built.processName == "renamed-process"


@pytest.mark.skipif(sys.version_info < (3, 12), reason="LogRecord.taskName exists from Python 3.12")
def test_template_record_task_name() -> None:
    logger = warm_logger()

    async def in_task() -> tuple[logging.LogRecord, logging.LogRecord]:
        return template_and_stock_records(logger, "inside a task")

    async def main() -> tuple[logging.LogRecord, logging.LogRecord]:
        return await asyncio.create_task(in_task(), name="record-task")

    built, stock = asyncio.run(main())
    outside_built, outside_stock = template_and_stock_records(logger, "outside a task")

    assert record_differences(built, stock) == []
    assert vars(built)["taskName"] == "record-task"
    assert record_differences(outside_built, outside_stock) == []
    assert vars(outside_built)["taskName"] is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_template_record_in_forked_child() -> None:
    logger = warm_logger()
    read_end, write_end = os.pipe()

    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            built, stock = template_and_stock_records(logger, "from the child")
            report = {"problems": record_differences(built, stock), "process": built.process, "pid": os.getpid()}
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)

    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        report = json.loads(reader.read() or b"{}")
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    assert report["problems"] == []
    assert report["process"] == pid
    assert report["pid"] == pid


def test_template_record_time_moves_forward() -> None:
    logger = warm_logger()
    with captured_records() as records:
        logger.output("first")
        time.sleep(0.01)
        logger.output("second")

    first, second = records
    assert second.created - first.created >= 0.009
    assert second.relativeCreated - first.relativeCreated >= 9.0


def print_hidden(line: str) -> str:
    """Return code that prints ``line``, without the line appearing in the command itself."""
    return f"print({line[::-1]!r}[::-1], flush=True)"


def test_deeply_indented_secret_never_logged(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    factory = SessionFactory(root)
    recorder = CallbackRecorder()
    indented = " " * 60 + "openjd_redacted_env: DEEP=d33p-s3cr3t"
    code = print_hidden(indented) + "\n" + print_hidden("d33p-s3cr3t in plain output")
    secrets = environment({"name": "Secrets", "script": {"actions": {"onEnter": python_action(code)}}})

    with LogCollector().attached() as logs:
        session = factory(callback=recorder, revision_extensions=REDACTION)
        try:
            session.enter_environment(environment=secrets)
            status = recorder.wait_final()
        finally:
            factory.close()

    assert status.state == ActionState.FAILED
    messages = logs.messages(session_id_of(session))
    assert any("openjd_redacted_env: DEEP=********" in message for message in messages)
    assert not any("d33p-s3cr3t" in message for message in logs.messages())


@pytest.mark.parametrize("args", [(), ("one",), ({"key": "value"},)])
def test_template_session_record_matches(args: tuple[Any, ...]) -> None:
    logger = SessionLogger("session-records")
    message = "Running %(key)s" if args and isinstance(args[0], dict) else "Running %s" if args else "Phase: Setup"
    with captured_records():
        logger.info("warm-up", content=LogContent.BANNER)
    assert logger._templates[(logging.INFO, LogContent.BANNER)] is not None

    with captured_records() as records:
        logger.info(message, *args, content=LogContent.BANNER)
        with record_factory(pass_through_factory):
            logger.info(message, *args, content=LogContent.BANNER)

    assert len(records) == 2
    assert record_differences(records[0], records[1]) == []
    assert records[0].getMessage() == records[1].getMessage()
