"""Session directories and the files a session writes into them.

A session owns a working directory under a root directory, and an embedded-files directory
inside it. Every file the library writes there (scripts, embedded files, the path-mapping
file, ``cancel_info.json``) goes through ``write_file``, which gives the file owner-only
permissions, or shares it with the group of the session's user when there is one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

from openjd.model.v2023_09 import EndOfLine

from ._session_user import PosixSessionUser, SessionUser, WindowsSessionUser

if TYPE_CHECKING:
    from ._path_mapping import PathMappingRule

if sys.platform == "win32":
    import ntsecuritycon
    import win32api
    import win32security

__all__ = (
    "CANCEL_INFO_FILENAME",
    "PROGRAMDATA_UNSET_WARNING",
    "STICKY_BIT_WARNING",
    "convert_line_endings",
    "create_files_directory",
    "create_working_directory",
    "default_root_directory",
    "prepare_default_root",
    "programdata_is_unset",
    "remove_tree",
    "sticky_bit_warnings",
    "utc_timestamp",
    "write_cancel_info",
    "write_file",
    "write_path_mapping_file",
)

CANCEL_INFO_FILENAME = "cancel_info.json"
PATH_MAPPING_VERSION = "pathmapping-1.0"
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

STICKY_BIT_WARNING = (
    "Sticky bit is not set on {}. This may pose a risk when running work on this host as users "
    "may modify or delete files in this directory which do not belong to them."
)
"""WARNING text for a world-writable ancestor of the root directory, formatted with its path."""

PROGRAMDATA_UNSET_WARNING = (
    'Environment variable "PROGRAMDATA" is not set. Creating the session working directories '
    "under C:\\ProgramData"
)
"""WARNING text the session logs when ``programdata_is_unset()`` is true."""

_DEFAULT_PROGRAMDATA = "C:\\ProgramData"
_DIRECTORY_MODE = 0o700
_SHARED_DIRECTORY_MODE = 0o770
_ROOT_MODE = 0o755
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)

# A CRLF pair, or a LF that no CR precedes.
_CRLF = re.compile("\r\n")
_BARE_LF = re.compile("(?<!\r)\n")

EndOfLineValue = Union[EndOfLine, str, None]


# Root directory


def default_root_directory() -> Path:
    """Return the directory under which sessions create their working directories.

    POSIX: ``OpenJD`` in ``tempfile.gettempdir()``, which honours ``TMPDIR``. Windows:
    ``%PROGRAMDATA%\\Amazon\\OpenJD``, with ``C:\\ProgramData`` when the variable is unset;
    the caller then logs ``PROGRAMDATA_UNSET_WARNING``.
    """
    if sys.platform == "win32":
        program_data = os.environ.get("PROGRAMDATA", _DEFAULT_PROGRAMDATA)
        return Path(os.path.join(program_data, "Amazon", "OpenJD"))
    return Path(os.path.join(tempfile.gettempdir(), "OpenJD"))


def programdata_is_unset() -> bool:
    """Tell whether the default root fell back to ``C:\\ProgramData`` (Windows only)."""
    return sys.platform == "win32" and "PROGRAMDATA" not in os.environ


def prepare_default_root(root: Path) -> None:
    """Create the default root directory if needed and set its mode to 0o755.

    The mode is set on every call, so a root owned by another user raises ``PermissionError``.
    """
    os.makedirs(root, exist_ok=True)
    root.mkdir(mode=_ROOT_MODE, exist_ok=True)
    os.chmod(root, _ROOT_MODE)


def sticky_bit_warnings(root: Path) -> list[Path]:
    """Return the ancestors of ``root`` that any user may write to but that lack the sticky bit.

    In such a directory any user can rename or delete entries of other users, including the
    path to the session's files. ``root`` itself is not checked. Always empty on Windows.
    """
    if sys.platform == "win32":
        return []
    unsafe = []
    for ancestor in Path(os.path.abspath(root)).parents:
        try:
            mode = os.stat(ancestor).st_mode
        except OSError:
            continue
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            unsafe.append(ancestor)
    return unsafe


# Session directories


def create_working_directory(root: Path, session_id: str, user: Optional[SessionUser]) -> Path:
    """Create the session's working directory ``<root>/<session_id><8 random characters>``.

    The directory is private to this process user (0o700), or shared with the group of a
    POSIX ``user`` (0o770), or readable and writable by a Windows ``user`` through its ACL.

    Raises:
        RuntimeError: the directory could not be created, or its group or ACL not set.
    """
    return _create_private_directory(root.resolve(), session_id, user)


def create_files_directory(working_dir: Path, user: Optional[SessionUser]) -> Path:
    """Create the directory that receives embedded files, ``embedded_files<8 characters>``.

    Permissions as in ``create_working_directory``.

    Raises:
        RuntimeError: the directory could not be created, or its group or ACL not set.
    """
    return _create_private_directory(working_dir, "embedded_files", user)


def _create_private_directory(parent: Path, prefix: str, user: Optional[SessionUser]) -> Path:
    try:
        _check_directory_prefix(prefix)
        path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    except (OSError, ValueError) as err:
        raise RuntimeError(f"Could not create temp directory within {parent}: {err}") from err

    try:
        _share_directory(path, parent, user)
    except RuntimeError:
        _remove_empty_directory(path)
        raise
    return path


def _check_directory_prefix(prefix: str) -> None:
    # mkdtemp joins the prefix to the parent, so a separator would place the directory
    # somewhere else, for example outside the root with "../".
    separators = {"/", os.sep, os.altsep or os.sep}
    found = sorted(sep for sep in separators if sep in prefix)
    if found:
        raise ValueError(
            f"the session id {prefix!r} contains the path separator {found[0]!r}. "
            "Use a session id without path separators"
        )


def _share_directory(path: Path, parent: Path, user: Optional[SessionUser]) -> None:
    if sys.platform == "win32":
        if isinstance(user, WindowsSessionUser):
            try:
                _replace_windows_acl(path, user)
            except OSError as err:
                raise RuntimeError(
                    f"Could not change permissions of directory '{path}' (error: {err})"
                ) from err
        return

    if isinstance(user, PosixSessionUser):
        # NOTE: the message names the parent directory, not the new one, as upstream
        # openjd-sessions 0.10.8 does.
        try:
            _chown_group(path, user.group)
        except OSError as err:
            raise RuntimeError(
                f"Could not change ownership of directory '{parent}' (error: {err}). Please "
                f"ensure that uid {os.geteuid()} is a member of group {user.group}."
            ) from err
        os.chmod(path, _SHARED_DIRECTORY_MODE)


def _remove_empty_directory(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _chown_group(path: Path, group: str) -> None:
    try:
        shutil.chown(path, group=group)
    except LookupError as err:
        raise OSError(f"group {group!r} not found on this host") from err


# Writing files


def convert_line_endings(text: str, end_of_line: EndOfLineValue) -> str:
    """Convert the line endings of ``text`` as an embedded file's ``endOfLine`` requests.

    ``LF`` turns each CRLF pair into LF and leaves a lone CR alone. ``CRLF`` turns each LF
    that no CR precedes into CRLF. ``AUTO`` and None use the host's convention: LF on
    POSIX, CRLF on Windows. ``end_of_line`` is an ``EndOfLine`` member or its string value.

    Raises:
        ValueError: ``end_of_line`` is not one of AUTO, LF, CRLF or None.
    """
    if end_of_line is None:
        mode = EndOfLine.AUTO
    else:
        try:
            mode = EndOfLine(end_of_line)
        except ValueError:
            accepted = ", ".join(member.value for member in EndOfLine)
            raise ValueError(
                f"Invalid end of line {end_of_line!r}: expected one of {accepted} or None."
            ) from None

    if mode == EndOfLine.AUTO:
        mode = EndOfLine.CRLF if sys.platform == "win32" else EndOfLine.LF
    if mode == EndOfLine.LF:
        return _CRLF.sub("\n", text)
    return _BARE_LF.sub("\r\n", text)


def write_file(
    path: Path,
    text: str,
    *,
    user: Optional[SessionUser],
    executable: bool = False,
    end_of_line: EndOfLineValue = None,
) -> None:
    """Write ``text`` as UTF-8 to ``path``, replacing any content, and set its permissions.

    The file is readable and writable by its owner only (0o600, 0o700 if ``executable``).
    With a POSIX ``user`` the file gets that user's group, and the group gets the owner's
    rights. With a Windows ``user`` the file's ACL grants that user read and write access.
    Line endings are converted first, as in ``convert_line_endings``.

    Raises:
        OSError: the file could not be written, or its group or ACL not set.
    """
    extra = stat.S_IXUSR | stat.S_IXGRP if executable else 0
    mode = stat.S_IRUSR | stat.S_IWUSR | (extra & stat.S_IRWXU)
    data = convert_line_endings(text, end_of_line).encode("utf-8")

    fd = os.open(path, _WRITE_FLAGS, mode)
    with open(fd, "wb") as stream:
        stream.write(data)

    if sys.platform == "win32":
        if isinstance(user, WindowsSessionUser):
            _replace_windows_acl(path, user)
        return

    if isinstance(user, PosixSessionUser):
        _chown_group(path, user.group)
        mode |= stat.S_IRGRP | stat.S_IWGRP | (extra & stat.S_IRWXG)
    # os.open applies the mode only when it creates the file, and mkstemp creates files first.
    os.chmod(path, mode)


def utc_timestamp(moment: datetime) -> str:
    """Format ``moment`` in UTC as ``YYYY-MM-DDTHH:MM:SSZ``, dropping fractions of a second.

    A naive ``moment`` is taken to be in UTC already.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime(TIMESTAMP_FORMAT)


def write_cancel_info(working_dir: Path, notify_end: datetime, user: Optional[SessionUser]) -> Path:
    """Write ``cancel_info.json`` with the end of the notify period, and return its path.

    The content is ``{"NotifyEnd": "<UTC time>"}`` without a trailing newline. A running
    process reads it when it receives the notify signal.
    """
    path = working_dir / CANCEL_INFO_FILENAME
    write_file(path, json.dumps({"NotifyEnd": utc_timestamp(notify_end)}), user=user)
    return path


def write_path_mapping_file(
    working_dir: Path, rules: Sequence[PathMappingRule], user: Optional[SessionUser]
) -> Path:
    """Write the path-mapping rules of one action to a new ``tmpXXXXXXXX.json`` file.

    ``rules`` are written in the given order, which should be the session's sorted order.
    Without rules the file contains ``{}``. Returns the file's path.
    """
    content: dict[str, object] = {}
    if rules:
        content = {
            "version": PATH_MAPPING_VERSION,
            "path_mapping_rules": [
                {
                    "source_path_format": rule.source_path_format.value,
                    "source_path": str(rule.source_path),
                    "destination_path": str(rule.destination_path),
                }
                for rule in rules
            ],
        }

    fd, name = tempfile.mkstemp(dir=working_dir, suffix=".json", text=True)
    os.close(fd)
    path = Path(name)
    write_file(path, json.dumps(content), user=user)
    return path


# Removing the working directory


def remove_tree(path: Path) -> list[str]:
    """Delete the directory tree at ``path`` as this process user.

    Directories without read, write or execute permission for their owner, which an action
    may leave behind, get those permissions and are retried. Permissions of ``path``'s own
    parent are never changed. A path that does not exist counts as removed.

    Returns the paths that could not be removed, or an empty list on success.
    """
    top = os.path.abspath(path)
    failures: list[str] = []
    retried: set[str] = set()

    def on_error(function: Callable[..., object], failed_path: str, error: BaseException) -> None:
        if isinstance(error, FileNotFoundError):
            return
        if _is_directory(failed_path) and _contains_failure(failed_path, failures):
            # The directory is not empty because of an entry already listed.
            return
        if not isinstance(error, PermissionError) or failed_path in retried:
            failures.append(failed_path)
            return
        retried.add(failed_path)
        try:
            _allow_removal(top, failed_path)
            if _is_directory(failed_path):
                _rmtree(failed_path, on_error)
            else:
                os.unlink(failed_path)
        except FileNotFoundError:
            pass
        except OSError:
            failures.append(failed_path)

    _rmtree(top, on_error)
    return failures


_ErrorHandler = Callable[[Callable[..., object], str, BaseException], None]


def _rmtree(path: str, on_error: _ErrorHandler) -> None:
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=on_error)
    else:
        shutil.rmtree(path, onerror=lambda func, p, info: on_error(func, p, info[1]))


def _allow_removal(top: str, path: str) -> None:
    """Give the owner full access to ``path``'s directory, and to ``path`` if a directory."""
    owner_rights = stat.S_IRWXU
    parent = os.path.dirname(path)
    if path != top and os.path.commonpath([top, parent]) == top:
        os.chmod(parent, os.stat(parent).st_mode | owner_rights)
    if _is_directory(path):
        os.chmod(path, os.stat(path).st_mode | owner_rights)
    elif sys.platform == "win32":
        # Windows cannot delete a file that has the read-only attribute.
        os.chmod(path, stat.S_IWRITE)


def _contains_failure(directory: str, failures: list[str]) -> bool:
    prefix = os.path.join(directory, "")
    return any(failure.startswith(prefix) for failure in failures)


def _is_directory(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


# Windows access control


if sys.platform == "win32":

    def _replace_windows_acl(path: Path, user: WindowsSessionUser) -> None:
        """Replace the ACL of ``path`` with full access for this process's user and modify
        access for ``user``, both inherited by files and subdirectories."""
        # NOTE: this function is not exercised by the tests, which run on Linux only.
        token = win32security.OpenProcessToken(
            win32api.GetCurrentProcess(), win32security.TOKEN_QUERY
        )
        process_sid = win32security.GetTokenInformation(token, win32security.TokenUser)[0]
        user_sid = win32security.LookupAccountName(None, user.user)[0]
        inherit = win32security.OBJECT_INHERIT_ACE | win32security.CONTAINER_INHERIT_ACE
        modify = (
            ntsecuritycon.FILE_GENERIC_READ
            | ntsecuritycon.FILE_GENERIC_WRITE
            | ntsecuritycon.FILE_GENERIC_EXECUTE
            | ntsecuritycon.DELETE
            | ntsecuritycon.FILE_DELETE_CHILD
        )

        acl = win32security.ACL()
        acl.AddAccessAllowedAceEx(
            win32security.ACL_REVISION, inherit, ntsecuritycon.FILE_ALL_ACCESS, process_sid
        )
        acl.AddAccessAllowedAceEx(win32security.ACL_REVISION, inherit, modify, user_sid)
        # The protected flag stops the parent's inheritable entries from being merged back in.
        replace_dacl = (
            win32security.DACL_SECURITY_INFORMATION
            | win32security.PROTECTED_DACL_SECURITY_INFORMATION
        )
        try:
            win32security.SetNamedSecurityInfo(
                str(path), win32security.SE_FILE_OBJECT, replace_dacl, None, None, acl, None
            )
        except win32api.error as err:
            raise OSError(f"setting the ACL of {path} failed: {err}") from err

else:

    def _replace_windows_acl(path: Path, user: WindowsSessionUser) -> None:
        raise NotImplementedError("Windows ACLs can only be set on Windows.")
