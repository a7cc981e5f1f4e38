"""Tests for writing a script's embedded files before its action runs."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest
from openjd.model import (
    ParameterValue,
    ParameterValueType,
    SymbolTable,
    create_job,
    decode_job_template,
)
from openjd.model.v2023_09 import DataString, EmbeddedFileText, EndOfLine

from openjd.sessions._embedded_files import EmbeddedFileError, materialize_embedded_files
from openjd.sessions._logging import LOG, LogContent, SessionLogger
from openjd.sessions._session_user import PosixSessionUser

pytestmark = pytest.mark.skipif(os.name != "posix", reason="tests POSIX permissions")

SESSION_ID = "embedded-test"


class RecordList(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[tuple[int, Optional[LogContent], str]]:
        return [
            (r.levelno, getattr(r, "openjd_log_content", None), r.getMessage())
            for r in self.records
        ]


@pytest.fixture
def records() -> Iterator[RecordList]:
    handler = RecordList()
    previous_level = LOG.level
    LOG.addHandler(handler)
    LOG.setLevel(logging.DEBUG)
    yield handler
    LOG.removeHandler(handler)
    LOG.setLevel(previous_level)


@pytest.fixture
def files_dir(tmp_path: Path) -> Path:
    path = tmp_path / "embedded_files"
    path.mkdir(mode=0o700)
    return path


def text_file(
    name: str,
    data: str,
    *,
    filename: Optional[str] = None,
    runnable: Optional[bool] = None,
    end_of_line: Optional[EndOfLine] = None,
) -> EmbeddedFileText:
    return EmbeddedFileText(
        name=name,
        type="TEXT",
        data=DataString(data),
        filename=filename,
        runnable=runnable,
        endOfLine=end_of_line,
    )


def materialize(
    files: list[EmbeddedFileText],
    files_dir: Path,
    symtab: Optional[SymbolTable] = None,
    prefix: str = "Task.File",
    target: str = "Task",
    user: Optional[PosixSessionUser] = None,
) -> SymbolTable:
    return materialize_embedded_files(
        files,
        files_directory=files_dir,
        symtab=symtab or SymbolTable(),
        prefix=prefix,
        target=target,
        user=user,
        logger=SessionLogger(SESSION_ID),
    )


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# Symbols and content


def test_symbols_reference_self_and_sibling(files_dir: Path) -> None:
    files = [
        text_file("A", "a={{Task.File.A}} b={{Task.File.B}}"),
        text_file("B", "b={{Task.File.B}} a={{Task.File.A}} {{Param.X}}", filename="b.txt"),
    ]
    symtab = SymbolTable(source={"Param.X": "x"})

    table = materialize(files, files_dir, symtab)

    path_a = Path(table["Task.File.A"])
    path_b = Path(table["Task.File.B"])
    assert path_b == files_dir / "b.txt"
    assert path_a.parent == files_dir
    assert path_a.read_text() == f"a={path_a} b={path_b}"
    assert path_b.read_text() == f"b={path_b} a={path_a} x"
    assert table["Param.X"] == "x"
    assert "Task.File.A" not in symtab


def test_environment_prefix_symbols(files_dir: Path, records: RecordList) -> None:
    files = [text_file("Setup", "{{Env.File.Setup}}")]

    table = materialize(files, files_dir, prefix="Env.File", target="Environment")

    path = Path(table["Env.File.Setup"])
    assert path.read_text() == str(path)
    header = (logging.INFO, None, "Writing embedded files for Environment to disk.")
    assert records.lines()[0] == header


def test_random_name_per_call(files_dir: Path) -> None:
    files = [text_file("A", "data")]

    first = Path(materialize(files, files_dir)["Task.File.A"])
    second = Path(materialize(files, files_dir)["Task.File.A"])

    assert re.fullmatch(r"tmp[a-z0-9_]{8}", first.name)
    assert first != second
    assert first.exists()
    assert second.exists()


def test_named_file_overwritten(files_dir: Path) -> None:
    (files_dir / "f.txt").write_text("old content that is longer")

    materialize([text_file("F", "new", filename="f.txt")], files_dir)

    assert (files_dir / "f.txt").read_text() == "new"


def test_modes_by_runnable_flag(files_dir: Path) -> None:
    files = [
        text_file("Plain", "x"),
        text_file("Run", "#!/bin/sh\n", runnable=True),
        text_file("NamedRun", "#!/bin/sh\n", runnable=True, filename="run.sh"),
        text_file("Off", "x", runnable=False, filename="off.txt"),
    ]

    table = materialize(files, files_dir)

    assert mode_of(Path(table["Task.File.Plain"])) == 0o600
    assert mode_of(Path(table["Task.File.Run"])) == 0o700
    assert mode_of(files_dir / "run.sh") == 0o700
    assert mode_of(files_dir / "off.txt") == 0o600


def test_modes_shared_with_user(files_dir: Path) -> None:
    groups = [g for g in grp.getgrall() if g.gr_gid != os.getegid()]
    if os.geteuid() != 0:
        groups = [g for g in groups if g.gr_gid in os.getgroups()]
    if not groups:
        pytest.skip("needs membership in a second group")
    user = PosixSessionUser(pwd.getpwuid(os.geteuid()).pw_name, group=groups[0].gr_name)
    files = [text_file("Plain", "x"), text_file("Run", "#!/bin/sh\n", runnable=True)]

    table = materialize(files, files_dir, user=user)

    plain = Path(table["Task.File.Plain"])
    run = Path(table["Task.File.Run"])
    assert mode_of(plain) == 0o660
    assert mode_of(run) == 0o770
    assert os.stat(plain).st_gid == groups[0].gr_gid
    assert os.stat(run).st_gid == groups[0].gr_gid


@pytest.mark.parametrize(
    ("data", "end_of_line", "expected"),
    [
        ("env file a b'c\r\nline2\n", None, b"env file a b'c\nline2\n"),
        ("x \u2026\n", EndOfLine.CRLF, "x \u2026\r\n".encode()),
        ("one\r\ntwo\r\n", EndOfLine.LF, b"one\ntwo\n"),
        ("five\r\nsix\n", EndOfLine.AUTO, b"five\nsix\n"),
    ],
)
def test_end_of_line_applied(
    files_dir: Path, data: str, end_of_line: Optional[EndOfLine], expected: bytes
) -> None:
    table = materialize([text_file("F", data, end_of_line=end_of_line)], files_dir)

    assert Path(table["Task.File.F"]).read_bytes() == expected


# Log records


def test_log_records_and_content_flags(files_dir: Path, records: RecordList) -> None:
    files = [text_file("A", "{{Task.File.A}}\r\n"), text_file("B", "b", filename="b.txt")]

    table = materialize(files, files_dir)

    path_a = table["Task.File.A"]
    path_b = table["Task.File.B"]
    both = LogContent.FILE_PATH | LogContent.PARAMETER_INFO
    assert records.lines() == [
        (logging.INFO, None, "Writing embedded files for Task to disk."),
        (logging.INFO, both, f"Mapping: Task.File.A -> {path_a}"),
        (logging.INFO, both, f"Mapping: Task.File.B -> {path_b}"),
        (logging.INFO, LogContent.FILE_PATH, f"Wrote: A -> {path_a}"),
        (logging.DEBUG, LogContent.FILE_CONTENTS, f"Contents:\n{path_a}\r\n"),
        (logging.INFO, LogContent.FILE_PATH, f"Wrote: B -> {path_b}"),
        (logging.DEBUG, LogContent.FILE_CONTENTS, "Contents:\nb"),
    ]
    assert all(getattr(r, "session_id", None) == SESSION_ID for r in records.records)


def test_contents_logged_as_template(files_dir: Path, records: RecordList) -> None:
    materialize([text_file("A", "100% done")], files_dir)

    contents = [r for r in records.records if r.levelno == logging.DEBUG]
    assert len(contents) == 1
    assert contents[0].msg == "Contents:\n%s"
    assert contents[0].args == ("100% done",)


def test_header_without_content_flag(files_dir: Path, records: RecordList) -> None:
    materialize([text_file("A", "x")], files_dir)

    assert not hasattr(records.records[0], "openjd_log_content")


# Errors


def test_unresolved_symbol_fails(files_dir: Path) -> None:
    with pytest.raises(EmbeddedFileError) as raised:
        materialize([text_file("A", "{{Param.Missing}}")], files_dir)

    assert isinstance(raised.value, RuntimeError)
    assert str(raised.value).startswith("Error resolving format string: ")
    assert "Param.Missing" in str(raised.value)


def test_missing_directory_named_file(tmp_path: Path) -> None:
    files_dir = tmp_path / "nodir"

    with pytest.raises(EmbeddedFileError) as raised:
        materialize([text_file("A", "x", filename="x.txt")], files_dir)

    assert str(raised.value) == (
        f"Could not write embedded file: [Errno 2] No such file or directory: "
        f"'{files_dir / 'x.txt'}'"
    )


def test_missing_directory_random_name(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedFileError, match="^Could not write embedded file: .*No such file"):
        materialize([text_file("A", "x")], tmp_path / "nodir")


# Filenames that leave the embedded-files directory


@pytest.mark.parametrize(
    ("filename", "reason"),
    [
        ("/openjd-test-missing/evil.sh", "is an absolute path"),
        ("../evil.sh", "contains the path separator '/'"),
        ("sub/evil.sh", "contains the path separator '/'"),
        ("sub\\evil.sh", "contains the path separator '\\\\'"),
        ("..", "is a reference to a directory"),
        (".", "is a reference to a directory"),
        ("a\0b", "contains a NUL character"),
    ],
)
def test_filename_rejected_before_writing(
    files_dir: Path, tmp_path: Path, records: RecordList, filename: str, reason: str
) -> None:
    files = [
        text_file("First", "x"),
        text_file("Named", "x", filename="ok.txt"),
        text_file("Bad", "x", filename=filename),
    ]

    with pytest.raises(EmbeddedFileError) as raised:
        materialize(files, files_dir)

    message = str(raised.value)
    assert f"Invalid filename {filename!r} of embedded file 'Bad'" in message
    assert reason in message
    assert "plain file name" in message
    assert str(files_dir) in message
    assert list(files_dir.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedded_files"]
    assert [line for _, _, line in records.lines()] == ["Writing embedded files for Task to disk."]


def test_filename_symlink_outside_rejected(files_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    (files_dir / "link.txt").symlink_to(outside)

    with pytest.raises(EmbeddedFileError, match="'link.txt' of embedded file 'L': it resolves to"):
        materialize([text_file("L", "overwritten", filename="link.txt")], files_dir)

    assert outside.read_text() == "keep"


def test_filename_symlink_inside_allowed(files_dir: Path) -> None:
    (files_dir / "real.txt").write_text("old")
    (files_dir / "link.txt").symlink_to(files_dir / "real.txt")

    materialize([text_file("L", "new", filename="link.txt")], files_dir)

    assert (files_dir / "real.txt").read_text() == "new"


@pytest.mark.parametrize("filename", ["...", "..x", "x..", ".hidden", "C:x", "name with space"])
def test_unusual_plain_filenames_allowed(files_dir: Path, filename: str) -> None:
    table = materialize([text_file("F", "data", filename=filename)], files_dir)

    assert Path(table["Task.File.F"]) == files_dir / filename
    assert (files_dir / filename).read_text() == "data"


# Files from a decoded job template


TEMPLATE = {
    "specificationVersion": "jobtemplate-2023-09",
    "extensions": ["FEATURE_BUNDLE_1"],
    "name": "Job",
    "parameterDefinitions": [{"name": "Word", "type": "STRING"}],
    "steps": [
        {
            "name": "Step",
            "script": {
                "actions": {"onRun": {"command": "{{Task.File.Run}}"}},
                "embeddedFiles": [
                    {
                        "name": "Run",
                        "type": "TEXT",
                        "runnable": True,
                        "filename": "run.sh",
                        "endOfLine": "LF",
                        "data": "#!/bin/sh\r\ncat {{Task.File.Data}}\r\n",
                    },
                    {
                        "name": "Data",
                        "type": "TEXT",
                        "endOfLine": "CRLF",
                        "data": "{{Param.Word}}\n",
                    },
                ],
            },
        }
    ],
}


def test_files_from_job_template(files_dir: Path) -> None:
    template = decode_job_template(
        template=TEMPLATE, supported_extensions=["FEATURE_BUNDLE_1"]
    )
    job = create_job(
        job_template=template,
        job_parameter_values={"Word": ParameterValue(type=ParameterValueType.STRING, value="hi")},
    )
    script = job.steps[0].script
    assert script.embeddedFiles is not None

    symtab = SymbolTable(source={"Param.Word": "hi"})

    table = materialize(list(script.embeddedFiles), files_dir, symtab)

    data_path = table["Task.File.Data"]
    assert (files_dir / "run.sh").read_bytes() == f"#!/bin/sh\ncat {data_path}\n".encode()
    assert mode_of(files_dir / "run.sh") == 0o700
    assert Path(data_path).read_bytes() == b"hi\r\n"
    assert mode_of(Path(data_path)) == 0o600
