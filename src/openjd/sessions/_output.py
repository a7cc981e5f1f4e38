"""Split the raw bytes of a process's output pipe into text lines."""

from __future__ import annotations

import codecs
from typing import Optional

__all__ = ("DEFAULT_MAX_ENV_LINE", "DEFAULT_MAX_LINE", "LineSplitter", "OversizedLine")

DEFAULT_MAX_LINE = 64_000
DEFAULT_MAX_ENV_LINE = 1 << 20

# Lines with these prefixes carry an environment variable whose value must arrive whole.
_ENV_PREFIXES = ("openjd_env: ", "openjd_redacted_env: ")
_MIN_MAX_LINE = max(len(prefix) for prefix in _ENV_PREFIXES)


class OversizedLine(str):
    """The first characters of an environment message line that exceeded the env line limit.

    The rest of the line was discarded. ``total_length`` counts every character of the line.
    """

    total_length: int

    def __new__(cls, head: str, total_length: int) -> OversizedLine:
        line = super().__new__(cls, head)
        line.total_length = total_length
        return line


class LineSplitter:
    """Turns chunks of pipe bytes into complete text lines, holding a bounded amount of text.

    Bytes are decoded as UTF-8, with U+FFFD for invalid bytes; a character split between two
    chunks decodes correctly. ``\\n``, ``\\r\\n`` and a lone ``\\r`` each end a line, even when
    the ``\\r`` and the ``\\n`` arrive in different chunks, and lines are returned without them.

    A line longer than ``max_line`` characters is returned in pieces of ``max_line``
    characters, as they arrive. An ``openjd_env: `` or ``openjd_redacted_env: `` line is kept
    whole up to ``max_env_line`` characters, because a variable value must not be cut.
    Beyond that it becomes one ``OversizedLine`` when it ends, and the text in between is
    dropped, so the buffer never holds more than about ``max_env_line`` characters plus one
    chunk.

    Not thread-safe: one reader thread feeds one splitter.
    """

    def __init__(
        self, max_line: int = DEFAULT_MAX_LINE, max_env_line: int = DEFAULT_MAX_ENV_LINE
    ) -> None:
        if max_line < _MIN_MAX_LINE:
            raise ValueError(
                f"max_line must be at least {_MIN_MAX_LINE} characters so that an environment "
                f"message prefix fits in one piece, got {max_line}."
            )
        if max_env_line < max_line:
            raise ValueError(
                f"max_env_line ({max_env_line}) must be at least max_line ({max_line})."
            )
        self._max_line = max_line
        self._max_env_line = max_env_line
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # The previous chunk ended with "\r", so a "\n" at the start of the next one belongs
        # to the same line end.
        self._skip_newline = False
        # Text of the current unfinished line, and its total length.
        self._parts: list[str] = []
        self._length = 0
        # Whether the unfinished line is an environment message: None until the line is
        # longer than max_line, which is the first time the answer matters.
        self._is_env: Optional[bool] = None
        # Set while the rest of an oversized environment line is being discarded.
        self._oversized_head: Optional[str] = None
        self._oversized_length = 0

    @property
    def buffered_chars(self) -> int:
        """Number of characters held for the unfinished line."""
        head = self._oversized_head
        return self._length + (len(head) if head is not None else 0)

    def feed(self, data: bytes) -> list[str]:
        """Decode ``data`` and return the lines that it completes."""
        return self._split(self._decoder.decode(data))

    def finish(self) -> list[str]:
        """Return the remaining lines at end of input, including a last line without newline.

        The splitter is empty afterwards and may be fed again.
        """
        lines = self._split(self._decoder.decode(b"", final=True))
        if self._parts or self._oversized_head is not None:
            lines.extend(self._end_line(""))
        self._skip_newline = False
        return lines

    def _split(self, text: str) -> list[str]:
        if not text:
            return []
        if self._skip_newline:
            self._skip_newline = False
            if text[0] == "\n":
                text = text[1:]
                if not text:
                    return []
        if "\r" in text:
            self._skip_newline = text[-1] == "\r"
            text = text.replace("\r\n", "\n").replace("\r", "\n")

        lines = text.split("\n")
        tail = lines.pop()
        if not lines:
            return self._extend_line(tail)

        done = self._end_line(lines[0])
        rest = lines[1:]
        if rest and max(map(len, rest)) <= self._max_line:
            done.extend(rest)
        else:
            for line in rest:
                done.extend(self._pieces(line, line.startswith(_ENV_PREFIXES)))
        done.extend(self._extend_line(tail))
        return done

    def _extend_line(self, text: str) -> list[str]:
        """Add ``text`` to the unfinished line; return the pieces that became complete."""
        if not text:
            return []
        if self._oversized_head is not None:
            self._oversized_length += len(text)
            return []
        self._parts.append(text)
        self._length += len(text)
        if self._length <= self._max_line:
            return []

        if self._is_env is None:
            self._parts = ["".join(self._parts)]
            self._is_env = self._parts[0].startswith(_ENV_PREFIXES)
        if self._is_env:
            if self._length > self._max_env_line:
                line = "".join(self._parts)
                self._reset_line()
                self._oversized_head = line[: self._max_line]
                self._oversized_length = len(line)
            return []

        # An ordinary long line: hand out whole pieces and keep 1 to max_line characters,
        # so that the end of the line never produces an empty piece.
        line = "".join(self._parts)
        cut = (len(line) - 1) // self._max_line * self._max_line
        rest = line[cut:]
        self._parts = [rest]
        self._length = len(rest)
        return [line[start : start + self._max_line] for start in range(0, cut, self._max_line)]

    def _end_line(self, text: str) -> list[str]:
        """Complete the unfinished line with ``text``; return it, or its remaining pieces."""
        if self._oversized_head is not None:
            oversized = OversizedLine(self._oversized_head, self._oversized_length + len(text))
            self._oversized_head = None
            self._oversized_length = 0
            return [oversized]
        if not self._parts:
            return self._pieces(text, text.startswith(_ENV_PREFIXES))

        self._parts.append(text)
        line = "".join(self._parts)
        is_env = self._is_env
        self._reset_line()
        if is_env is None:
            is_env = line.startswith(_ENV_PREFIXES)
        return self._pieces(line, is_env)

    def _pieces(self, line: str, is_env: bool) -> list[str]:
        length = len(line)
        if length <= self._max_line:
            return [line]
        if is_env:
            if length <= self._max_env_line:
                return [line]
            return [OversizedLine(line[: self._max_line], length)]
        return [line[start : start + self._max_line] for start in range(0, length, self._max_line)]

    def _reset_line(self) -> None:
        self._parts = []
        self._length = 0
        self._is_env = None
