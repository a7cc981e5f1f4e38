"""Tests for session directories, the standard file writer and tree removal."""

from __future__ import annotations

import grp
import json
import os
import pickle
import pwd
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, TypeVar

import pytest
from openjd.model.v2023_09 import EndOfLine

from openjd.sessions._files import (
    STICKY_BIT_WARNING,
    convert_line_endings,
    create_files_directory,
    create_working_directory,
    default_root_directory,
    prepare_default_root,
    programdata_is_unset,
    remove_tree,
    sticky_bit_warnings,
    utc_timestamp,
    write_cancel_info,
    write_file,
    write_path_mapping_file,
)
from openjd.sessions._path_mapping import PathFormat, PathMappingRule, sort_rules
from openjd.sessions._session_user import PosixSessionUser

pytestmark = pytest.mark.skipif(os.name != "posix", reason="tests POSIX permissions")

T = TypeVar("T")

RANDOM_SUFFIX = "[a-z0-9_]{8}"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def process_user_name() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def other_group() -> grp.struct_group:
    """Return a group other than the effective one that this process may give files to."""
    if os.geteuid() == 0:
        candidates = [group.gr_gid for group in grp.getgrall()]
    else:
        candidates = os.getgroups()
    for gid in candidates:
        if gid != os.getegid():
            return grp.getgrgid(gid)
    pytest.skip("needs membership in a second group")


def unused_uid() -> int:
    for uid in range(54321, 54421):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    raise RuntimeError("no unused uid between 54321 and 54420")


def run_unprivileged(uid: int, function: Callable[[], T]) -> T:
    """Run ``function`` in a forked child that has dropped root privileges to ``uid``.

    Root ignores file permissions, so permission handling can only be observed by a process
    without root rights. Without root the child keeps this process's user.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            try:
                outcome: tuple[bool, object] = (True, function())
            except BaseException as err:  # sent to the parent, which re-raises it
                outcome = (False, err)
            with os.fdopen(write_end, "wb") as stream:
                pickle.dump(outcome, stream)
        except BaseException:
            status = 1
        finally:
            os._exit(status)

    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        data = stream.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0, "the unprivileged child failed before it could report a result"
    succeeded, value = pickle.loads(data)
    if not succeeded:
        raise value
    return value  # type: ignore[no-any-return]


def unprivileged_uid() -> int:
    return unused_uid() if os.geteuid() == 0 else os.geteuid()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory outside the private pytest tree, owned by the unprivileged test uid."""
    uid = unprivileged_uid()
    path = Path(tempfile.mkdtemp(prefix="openjd-files-test"))
    os.chmod(path, 0o755)
    if os.geteuid() == 0:
        os.chown(path, uid, uid)
    yield path
    for directory, _, _ in os.walk(path):
        os.chmod(directory, 0o700)
    shutil.rmtree(path)


# Root directory


def test_default_root_follows_tempdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    assert default_root_directory() == tmp_path / "OpenJD"
    assert not programdata_is_unset()


def test_prepare_root_creates_parents(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "OpenJD"

    prepare_default_root(root)

    assert root.is_dir()
    assert mode_of(root) == 0o755


def test_prepare_root_resets_mode(tmp_path: Path) -> None:
    root = tmp_path / "OpenJD"
    root.mkdir(mode=0o700)
    os.chmod(root, 0o777)

    prepare_default_root(root)

    assert mode_of(root) == 0o755


def test_prepare_root_of_other_owner(shared_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a directory owned by another user")
    root = shared_dir / "OpenJD"
    root.mkdir(mode=0o777)
    os.chmod(root, 0o777)

    with pytest.raises(PermissionError):
        run_unprivileged(unprivileged_uid(), lambda: prepare_default_root(root))
    assert mode_of(root) == 0o777


def test_sticky_bit_missing_reported(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    root = open_dir / "OpenJD"
    root.mkdir()
    os.chmod(root, 0o777)

    unsafe = sticky_bit_warnings(root)

    assert open_dir in unsafe
    assert root not in unsafe
    assert tmp_path not in unsafe


def test_sticky_bit_set_not_reported(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o1777)

    assert open_dir not in sticky_bit_warnings(open_dir / "OpenJD")


def test_sticky_bit_warning_text() -> None:
    text = STICKY_BIT_WARNING.format(Path("/shared"))

    assert text == (
        "Sticky bit is not set on /shared. This may pose a risk when running work on this "
        "host as users may modify or delete files in this directory which do not belong to "
        "them."
    )


# Session directories


def test_working_directory_name_and_mode(tmp_path: Path) -> None:
    path = create_working_directory(tmp_path, "sid1", None)

    assert path.parent == tmp_path.resolve()
    assert re.fullmatch(f"sid1{RANDOM_SUFFIX}", path.name)
    assert mode_of(path) == 0o700
    assert os.stat(path).st_gid == os.getegid()


def test_working_directory_with_user_group(tmp_path: Path) -> None:
    group = other_group()
    user = PosixSessionUser(process_user_name(), group=group.gr_name)

    path = create_working_directory(tmp_path, "sid", user)

    assert os.stat(path).st_gid == group.gr_gid
    assert os.stat(path).st_uid == os.geteuid()
    assert mode_of(path) == 0o770


def test_working_directory_unknown_group(tmp_path: Path) -> None:
    user = PosixSessionUser(process_user_name(), group="openjd-no-such-group")

    with pytest.raises(RuntimeError) as raised:
        create_working_directory(tmp_path, "sid", user)

    message = str(raised.value)
    assert message.startswith(f"Could not change ownership of directory '{tmp_path.resolve()}'")
    assert message.endswith(
        f"Please ensure that uid {os.geteuid()} is a member of group openjd-no-such-group."
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("session_id", ["a/b", "../escape", "a/"])
def test_working_directory_rejects_separator(tmp_path: Path, session_id: str) -> None:
    (tmp_path / "a").mkdir()

    with pytest.raises(RuntimeError) as raised:
        create_working_directory(tmp_path, session_id, None)

    message = str(raised.value)
    assert message.startswith(f"Could not create temp directory within {tmp_path.resolve()}: ")
    assert repr(session_id) in message
    assert list((tmp_path / "a").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    assert not any(p.name.startswith("escape") for p in tmp_path.parent.iterdir())


def test_working_directory_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "missing"

    with pytest.raises(RuntimeError) as raised:
        create_working_directory(root, "sid", None)

    assert str(raised.value).startswith(f"Could not create temp directory within {root}: ")
    assert "No such file or directory" in str(raised.value)


def test_working_directory_nul_in_id(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="^Could not create temp directory within "):
        create_working_directory(tmp_path, "a\0b", None)


def test_files_directory_name_and_mode(tmp_path: Path) -> None:
    path = create_files_directory(tmp_path, None)

    assert path.parent == tmp_path
    assert re.fullmatch(f"embedded_files{RANDOM_SUFFIX}", path.name)
    assert mode_of(path) == 0o700


def test_files_directory_with_user_group(tmp_path: Path) -> None:
    group = other_group()
    user = PosixSessionUser(process_user_name(), group=group.gr_name)

    path = create_files_directory(tmp_path, user)

    assert os.stat(path).st_gid == group.gr_gid
    assert mode_of(path) == 0o770


def test_files_directory_unknown_group(tmp_path: Path) -> None:
    user = PosixSessionUser(process_user_name(), group="openjd-no-such-group")

    with pytest.raises(RuntimeError) as raised:
        create_files_directory(tmp_path, user)

    assert str(raised.value).startswith(f"Could not change ownership of directory '{tmp_path}'")
    assert list(tmp_path.iterdir()) == []


# Line endings


LINE_ENDING_CASES = [
    ("env file a b'c\r\nline2\n", None, "env file a b'c\nline2\n"),
    ("x \u2026\n", EndOfLine.CRLF, "x \u2026\r\n"),
    ("a\r\nb\nc\rd", EndOfLine.LF, "a\nb\nc\rd"),
    ("a\r\nb\nc\rd", "LF", "a\nb\nc\rd"),
    ("a\r\nb\nc\rd", EndOfLine.CRLF, "a\r\nb\r\nc\rd"),
    ("a\r\nb\nc\rd", "CRLF", "a\r\nb\r\nc\rd"),
    ("\n\n\r\n", EndOfLine.CRLF, "\r\n\r\n\r\n"),
    ("\r\r\n", EndOfLine.LF, "\r\n"),
    ("no newline", EndOfLine.CRLF, "no newline"),
    ("", EndOfLine.LF, ""),
]


@pytest.mark.parametrize(("text", "end_of_line", "expected"), LINE_ENDING_CASES)
def test_line_endings_conversion_table(
    text: str, end_of_line: EndOfLine | str | None, expected: str
) -> None:
    assert convert_line_endings(text, end_of_line) == expected


@pytest.mark.parametrize("end_of_line", [None, EndOfLine.AUTO, "AUTO"])
def test_line_endings_auto_uses_host(end_of_line: EndOfLine | str | None) -> None:
    native = "\r\n" if sys.platform == "win32" else "\n"

    assert convert_line_endings("a\r\nb\nc", end_of_line) == f"a{native}b{native}c"


def test_line_endings_invalid_value() -> None:
    with pytest.raises(ValueError, match="'CR'.*AUTO, LF, CRLF"):
        convert_line_endings("a\n", "CR")


# The standard file writer


def test_write_file_private_mode(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"

    write_file(path, "caf\u00e9 \u2713\r\n", user=None)

    assert path.read_bytes() == "caf\u00e9 \u2713\n".encode()
    assert mode_of(path) == 0o600


def test_write_file_executable_mode(tmp_path: Path) -> None:
    path = tmp_path / "run.sh"

    write_file(path, "#!/bin/sh\n", user=None, executable=True)

    assert mode_of(path) == 0o700


def test_write_file_ignores_umask(tmp_path: Path) -> None:
    path = tmp_path / "run.sh"
    previous = os.umask(0o777)
    try:
        write_file(path, "x", user=None, executable=True)
    finally:
        os.umask(previous)

    assert mode_of(path) == 0o700


def test_write_file_existing_file_reset(tmp_path: Path) -> None:
    fd, name = tempfile.mkstemp(dir=tmp_path)
    os.write(fd, b"much longer old content")
    os.close(fd)
    path = Path(name)
    os.chmod(path, 0o777)

    write_file(path, "new", user=None)

    assert path.read_bytes() == b"new"
    assert mode_of(path) == 0o600


def test_write_file_end_of_line(tmp_path: Path) -> None:
    path = tmp_path / "f.bat"

    write_file(path, "a\nb\n", user=None, end_of_line=EndOfLine.CRLF)

    assert path.read_bytes() == b"a\r\nb\r\n"


@pytest.mark.parametrize(("executable", "expected_mode"), [(False, 0o660), (True, 0o770)])
def test_write_file_shared_with_user(tmp_path: Path, executable: bool, expected_mode: int) -> None:
    group = other_group()
    user = PosixSessionUser(process_user_name(), group=group.gr_name)
    path = tmp_path / "f"

    write_file(path, "x", user=user, executable=executable)

    assert os.stat(path).st_gid == group.gr_gid
    assert mode_of(path) == expected_mode


def test_write_file_unknown_group(tmp_path: Path) -> None:
    user = PosixSessionUser(process_user_name(), group="openjd-no-such-group")

    with pytest.raises(OSError, match="openjd-no-such-group"):
        write_file(tmp_path / "f", "x", user=user)


# cancel_info.json and timestamps


def test_cancel_info_exact_content(tmp_path: Path) -> None:
    end = datetime(2026, 12, 4, 19, 22, 34, 987654, tzinfo=timezone.utc)

    path = write_cancel_info(tmp_path, end, None)

    assert path == tmp_path / "cancel_info.json"
    assert path.read_bytes() == b'{"NotifyEnd": "2026-12-04T19:22:34Z"}'
    assert mode_of(path) == 0o600


def test_cancel_info_rewritten(tmp_path: Path) -> None:
    write_cancel_info(tmp_path, datetime(2030, 1, 1, tzinfo=timezone.utc), None)

    path = write_cancel_info(tmp_path, datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), None)

    assert json.loads(path.read_text()) == {"NotifyEnd": "2026-01-02T03:04:05Z"}


def test_utc_timestamp_converts_zone() -> None:
    moment = datetime(2026, 12, 4, 21, 0, 59, 999999, tzinfo=timezone(timedelta(hours=2)))

    assert utc_timestamp(moment) == "2026-12-04T19:00:59Z"


def test_utc_timestamp_naive_is_utc() -> None:
    assert utc_timestamp(datetime(2026, 12, 4, 19, 22, 34, 500000)) == "2026-12-04T19:22:34Z"


# Path-mapping file


def test_path_mapping_file_without_rules(tmp_path: Path) -> None:
    path = write_path_mapping_file(tmp_path, [], None)

    assert path.parent == tmp_path
    assert re.fullmatch(r"tmp[a-z0-9_]{8}\.json", path.name)
    assert path.read_bytes() == b"{}"
    assert mode_of(path) == 0o600


def test_path_mapping_file_three_rules(tmp_path: Path) -> None:
    rules = sort_rules(
        [
            PathMappingRule(
                source_path_format=PathFormat.POSIX,
                source_path=PurePosixPath("/a"),
                destination_path=PurePosixPath("/short"),
            ),
            PathMappingRule(
                source_path_format=PathFormat.WINDOWS,
                source_path=PureWindowsPath("C:\\a\\b"),
                destination_path=PurePosixPath("/win"),
            ),
            PathMappingRule(
                source_path_format=PathFormat.POSIX,
                source_path=PurePosixPath("/a/b/c"),
                destination_path=PurePosixPath("/long"),
            ),
        ]
    )

    path = write_path_mapping_file(tmp_path, rules, None)

    expected = (
        '{"version": "pathmapping-1.0", "path_mapping_rules": ['
        '{"source_path_format": "POSIX", "source_path": "/a/b/c", "destination_path": "/long"}, '
        r'{"source_path_format": "WINDOWS", "source_path": "C:\\a\\b", "destination_path": "/win"}'
        ', {"source_path_format": "POSIX", "source_path": "/a", "destination_path": "/short"}]}'
    )
    assert path.read_text() == expected


def test_path_mapping_file_new_each_call(tmp_path: Path) -> None:
    first = write_path_mapping_file(tmp_path, [], None)
    second = write_path_mapping_file(tmp_path, [], None)

    assert first != second
    assert first.exists()


def test_path_mapping_file_shared_with_user(tmp_path: Path) -> None:
    group = other_group()
    user = PosixSessionUser(process_user_name(), group=group.gr_name)

    path = write_path_mapping_file(tmp_path, [], user)

    assert os.stat(path).st_gid == group.gr_gid
    assert mode_of(path) == 0o660


# Tree removal


def build_locked_tree(top: Path) -> None:
    """Create a tree that plain ``shutil.rmtree`` cannot delete without root rights."""
    (top / "readonly" / "inner").mkdir(parents=True)
    (top / "readonly" / "inner" / "file").write_text("x")
    (top / "readonly" / "file").write_text("x")
    (top / "unreadable").mkdir()
    (top / "unreadable" / "file").write_text("x")
    (top / "file-without-write").write_text("x")
    os.chmod(top / "file-without-write", 0o000)
    os.chmod(top / "readonly" / "inner", 0o500)
    os.chmod(top / "readonly", 0o500)
    os.chmod(top / "unreadable", 0o000)
    os.chmod(top, 0o500)


def test_remove_tree_plain_tree(tmp_path: Path) -> None:
    top = tmp_path / "work"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "f").write_text("x")
    (top / "link").symlink_to(tmp_path)

    assert remove_tree(top) == []
    assert not top.exists()
    assert tmp_path.exists()


def test_remove_tree_missing_path(tmp_path: Path) -> None:
    assert remove_tree(tmp_path / "missing") == []


def test_remove_tree_locked_tree(shared_dir: Path) -> None:
    top = shared_dir / "work"

    def build_and_remove() -> list[str]:
        top.mkdir()
        build_locked_tree(top)
        with pytest.raises(PermissionError):
            shutil.rmtree(top / "readonly")
        return remove_tree(top)

    assert run_unprivileged(unprivileged_uid(), build_and_remove) == []
    assert not top.exists()


def test_remove_tree_reports_failures(shared_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a directory owned by another user")
    top = shared_dir / "work"
    top.mkdir()
    os.chown(top, unprivileged_uid(), unprivileged_uid())
    (top / "removable").write_text("x")
    foreign = top / "foreign"
    foreign.mkdir(mode=0o755)
    (foreign / "file").write_text("x")

    failures = run_unprivileged(unprivileged_uid(), lambda: remove_tree(top))

    assert failures == [str(foreign / "file")]
    assert (foreign / "file").exists()
    assert not (top / "removable").exists()
    assert mode_of(foreign) == 0o755


def test_remove_tree_keeps_parent_mode(shared_dir: Path) -> None:
    top = shared_dir / "work"

    def build_and_remove() -> tuple[list[str], int]:
        top.mkdir()
        (top / "f").write_text("x")
        os.chmod(shared_dir, 0o555)
        failures = remove_tree(top)
        return failures, mode_of(shared_dir)

    failures, parent_mode = run_unprivileged(unprivileged_uid(), build_and_remove)

    assert failures == [str(top)]
    assert parent_mode == 0o555
    assert top.exists()
