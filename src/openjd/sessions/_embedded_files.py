"""Writing a script's embedded files to disk before its action runs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Optional

from openjd.model import FormatStringError, SymbolTable
from openjd.model.v2023_09 import EmbeddedFileText

from ._files import write_file
from ._logging import LogContent, SessionLogger
from ._session_user import SessionUser

__all__ = ("EmbeddedFileError", "materialize_embedded_files")


class EmbeddedFileError(RuntimeError):
    """An embedded file could not be written. The message names the file and the reason."""


def materialize_embedded_files(
    files: Sequence[EmbeddedFileText],
    *,
    files_directory: Path,
    symtab: SymbolTable,
    prefix: str,
    target: str,
    user: Optional[SessionUser],
    logger: SessionLogger,
) -> SymbolTable:
    """Write ``files`` into ``files_directory`` and return ``symtab`` plus their symbols.

    Each file gets the symbol ``{prefix}.{name}`` with its absolute path, for example
    ``Task.File.Run``. A file without ``filename`` gets a new random name on every call.
    All symbols are defined before any data is resolved, so a file's data may refer to its
    own path and to its siblings' paths. ``target`` ("Environment" or "Task") names the
    script's owner in the first log line.

    Raises:
        EmbeddedFileError: a ``filename`` is not a plain file name (checked before anything
            is written), a file could not be created or written, or its data has a format
            string that does not resolve.
    """
    logger.info(f"Writing embedded files for {target} to disk.")
    for file in files:
        _check_filename(file, files_directory)

    table = SymbolTable(source=symtab)
    paths = []
    for file in files:
        path = _file_path(file, files_directory)
        symbol = f"{prefix}.{file.name}"
        table[symbol] = str(path)
        paths.append(path)
        logger.info(
            f"Mapping: {symbol} -> {path}",
            content=LogContent.FILE_PATH | LogContent.PARAMETER_INFO,
        )

    for file, path in zip(files, paths):
        _write_embedded_file(file, path, table, user, logger)
    return table


def _file_path(file: EmbeddedFileText, files_directory: Path) -> Path:
    if file.filename is not None:
        return files_directory / file.filename
    try:
        fd, name = tempfile.mkstemp(dir=files_directory)
    except OSError as err:
        raise EmbeddedFileError(f"Could not write embedded file: {err}") from err
    os.close(fd)
    return Path(name)


def _write_embedded_file(
    file: EmbeddedFileText,
    path: Path,
    table: SymbolTable,
    user: Optional[SessionUser],
    logger: SessionLogger,
) -> None:
    try:
        data = file.data.resolve(symtab=table)
    except FormatStringError as err:
        raise EmbeddedFileError(f"Error resolving format string: {err}") from err

    try:
        write_file(
            path,
            data,
            user=user,
            executable=bool(file.runnable),
            end_of_line=file.endOfLine,
        )
    except OSError as err:
        raise EmbeddedFileError(f"Could not write embedded file: {err}") from err

    logger.info(f"Wrote: {file.name} -> {path}", content=LogContent.FILE_PATH)
    logger.debug("Contents:\n%s", data, content=LogContent.FILE_CONTENTS)


def _check_filename(file: EmbeddedFileText, files_directory: Path) -> None:
    """Reject a ``filename`` that would place the file outside ``files_directory``."""
    filename = file.filename
    if filename is None:
        return

    problem = _filename_problem(filename)
    if problem is None:
        directory = os.path.realpath(files_directory)
        target = os.path.realpath(os.path.join(directory, filename))
        if os.path.dirname(target) != directory:
            problem = f"resolves to {target}, outside the directory"
    if problem is None:
        return

    raise EmbeddedFileError(
        f"Invalid filename {filename!r} of embedded file {file.name!r}: it {problem}. A "
        "filename must be a plain file name so that the file is written directly inside the "
        f"session's embedded-files directory {files_directory}. Use a name without path "
        "separators, such as 'run.sh', or omit filename to get a random name."
    )


def _filename_problem(filename: str) -> Optional[str]:
    if "\0" in filename:
        return "contains a NUL character"
    if (
        PurePosixPath(filename).is_absolute()
        or PureWindowsPath(filename).is_absolute()
        or Path(filename).anchor
    ):
        return "is an absolute path"
    separators = sorted({"/", "\\", os.sep} & set(filename))
    if separators:
        return f"contains the path separator {separators[0]!r}"
    if filename in (".", ".."):
        return "is a reference to a directory, not a file name"
    return None
