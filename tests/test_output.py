"""Tests for ``LineSplitter``: decoding, line ends, long lines and bounded buffering."""

from __future__ import annotations

import pytest

from openjd.sessions._output import LineSplitter, OversizedLine


def split_all(chunks: list[bytes], **limits: int) -> list[str]:
    splitter = LineSplitter(**limits)
    lines: list[str] = []
    for chunk in chunks:
        lines.extend(splitter.feed(chunk))
    lines.extend(splitter.finish())
    return lines


def split_bytewise(data: bytes, **limits: int) -> list[str]:
    return split_all([data[index : index + 1] for index in range(len(data))], **limits)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"one\ntwo\n", ["one", "two"]),
        (b"one\r\ntwo\r\n", ["one", "two"]),
        (b"one\rtwo\r", ["one", "two"]),
        (b"one\r\r\ntwo", ["one", "", "two"]),
        (b"\n\n", ["", ""]),
        (b"\r\n\r\n", ["", ""]),
        (b"no newline", ["no newline"]),
        (b"", []),
        (b"  spaced \t\n", ["  spaced \t"]),
        (b"a\x0bb\x0cc\x1cd\n", ["a\x0bb\x0cc\x1cd"]),
        ("x\x85y\u2028z\u2029w\n".encode(), ["x\x85y\u2028z\u2029w"]),
        (b"nul\x00byte\n", ["nul\x00byte"]),
    ],
)
def test_splitter_line_ends(data: bytes, expected: list[str]) -> None:
    assert split_all([data]) == expected
    assert split_bytewise(data) == expected


def test_feed_returns_complete_lines() -> None:
    splitter = LineSplitter()

    assert splitter.feed(b"first\nsec") == ["first"]
    assert splitter.feed(b"ond") == []
    assert splitter.buffered_chars == 6
    assert splitter.feed(b"\nthird") == ["second"]
    assert splitter.finish() == ["third"]
    assert splitter.finish() == []
    assert splitter.buffered_chars == 0


def test_crlf_across_chunk_boundary() -> None:
    splitter = LineSplitter()

    assert splitter.feed(b"one\r") == ["one"]
    assert splitter.feed(b"\ntwo\r") == ["two"]
    assert splitter.feed(b"") == []
    assert splitter.feed(b"\n") == []
    assert splitter.feed(b"\r") == [""]
    assert splitter.feed(b"three") == []
    assert splitter.finish() == ["three"]


def test_invalid_utf8_replaced() -> None:
    assert split_all([b"caf\x97 ok\n"]) == ["caf\ufffd ok"]
    assert split_all([b"\xff\xfe\n", b"\xed\xa0\x80\n"]) == ["\ufffd\ufffd", "\ufffd\ufffd\ufffd"]


def test_multibyte_split_across_chunks() -> None:
    splitter = LineSplitter()

    assert splitter.feed(b"price \xe2") == []
    assert splitter.feed(b"\x82") == []
    assert splitter.feed(b"\xac\n\xf0\x9f") == ["price \u20ac"]
    assert splitter.feed(b"\x98\x80!\n") == ["\U0001f600!"]


def test_incomplete_multibyte_at_end() -> None:
    splitter = LineSplitter()

    assert splitter.feed(b"cut \xe2\x82") == []
    assert splitter.finish() == ["cut \ufffd"]


def test_long_line_cut_into_pieces() -> None:
    lines = split_all([b"a" * 70_000 + b"\nnext\n"])

    assert [len(line) for line in lines] == [64_000, 6_000, 4]
    assert lines[2] == "next"


def test_long_line_exact_multiple() -> None:
    data = b"b" * 128_000 + b"\n"

    assert [len(line) for line in split_all([data])] == [64_000, 64_000]
    assert [len(line) for line in split_all([data[:64_000], data[64_000:]])] == [64_000, 64_000]
    assert [len(line) for line in split_all([data[:-1]])] == [64_000, 64_000]


def test_long_line_pieces_as_they_arrive() -> None:
    splitter = LineSplitter(max_line=100, max_env_line=1_000)

    assert splitter.feed(b"x" * 150) == ["x" * 100]
    assert splitter.buffered_chars == 50
    assert splitter.feed(b"y" * 150) == ["x" * 50 + "y" * 50]
    assert splitter.buffered_chars == 100
    assert splitter.feed(b"z\n") == ["y" * 100, "z"]


def test_long_line_same_for_any_chunking() -> None:
    data = b"".join(f"{index:05d}".encode() * (index * 7) + b"\n" for index in range(60))
    whole = split_all([data], max_line=100, max_env_line=200)

    assert split_bytewise(data, max_line=100, max_env_line=200) == whole
    assert all(len(line) <= 100 for line in whole)
    assert "".join(whole) == data.decode().replace("\n", "")


def test_env_line_kept_whole() -> None:
    value = "v" * 70_000
    for prefix in ("openjd_env: BIG=", "openjd_redacted_env: BIG="):
        data = (prefix + value + "\n").encode()

        assert split_all([data]) == [prefix + value]
        chunks = [data[index : index + 4096] for index in range(0, len(data), 4096)]
        assert split_all(chunks) == [prefix + value]


def test_env_line_up_to_limit() -> None:
    line = "openjd_env: X=" + "v" * 186

    assert split_all([line.encode()], max_line=100, max_env_line=200) == [line]
    assert split_bytewise(line.encode() + b"\n", max_line=100, max_env_line=200) == [line]


@pytest.mark.parametrize("chunk_size", [1, 7, 300, 100_000])
def test_env_line_over_env_limit(chunk_size: int) -> None:
    line = "openjd_env: X=" + "v" * 486
    data = (line + "\nafter\n").encode()
    chunks = [data[index : index + chunk_size] for index in range(0, len(data), chunk_size)]

    lines = split_all(chunks, max_line=100, max_env_line=200)

    assert lines == [line[:100], "after"]
    assert isinstance(lines[0], OversizedLine)
    assert lines[0].total_length == 500
    assert not isinstance(lines[1], OversizedLine)


def test_oversized_env_line_at_end() -> None:
    splitter = LineSplitter(max_line=100, max_env_line=200)

    assert splitter.feed(b"openjd_redacted_env: X=" + b"s" * 277) == []
    assert splitter.buffered_chars == 100
    assert splitter.feed(b"s" * 1_000) == []
    assert splitter.buffered_chars == 100
    lines = splitter.finish()

    assert len(lines) == 1
    assert isinstance(lines[0], OversizedLine)
    assert lines[0] == "openjd_redacted_env: X=" + "s" * 77
    assert lines[0].total_length == 1_300
    assert splitter.buffered_chars == 0


def test_env_prefix_only_at_line_start() -> None:
    inner = "a" * 100 + "openjd_env: X=" + "b" * 186
    indented = " openjd_env: X=" + "c" * 185

    assert [len(line) for line in split_all([inner.encode()], max_line=100)] == [100, 100, 100]
    assert split_all([indented.encode()], max_line=100, max_env_line=200) == [
        indented[:100],
        indented[100:],
    ]


def test_env_prefix_after_cut_not_whole() -> None:
    # The rest of a long ordinary line that happens to start with the env prefix is not an
    # environment message.
    line = "a" * 100 + "openjd_env: X=" + "b" * 186
    chunks = [line[:150].encode(), line[150:].encode(), b"\n"]

    assert [len(piece) for piece in split_all(chunks, max_line=100)] == [100, 100, 100]


def test_huge_line_memory_bounded() -> None:
    splitter = LineSplitter()
    chunk = b"m" * 65_536
    total = 0
    largest_buffer = 0

    for _ in range(1_600):
        pieces = splitter.feed(chunk)
        total += sum(len(piece) for piece in pieces)
        assert all(len(piece) == 64_000 for piece in pieces)
        largest_buffer = max(largest_buffer, splitter.buffered_chars)
    total += sum(len(piece) for piece in splitter.finish())

    assert total == 100 * 1024 * 1024
    assert largest_buffer <= 64_000


def test_huge_env_line_memory_bounded() -> None:
    splitter = LineSplitter()
    chunk = b"e" * 65_536
    largest_buffer = 0

    assert splitter.feed(b"openjd_env: HUGE=") == []
    for _ in range(1_600):
        assert splitter.feed(chunk) == []
        largest_buffer = max(largest_buffer, splitter.buffered_chars)
    lines = splitter.feed(b"\n")

    assert largest_buffer <= (1 << 20) + 65_536
    assert len(lines) == 1
    assert isinstance(lines[0], OversizedLine)
    assert len(lines[0]) == 64_000
    assert lines[0].total_length == len("openjd_env: HUGE=") + 1_600 * 65_536


def test_many_short_lines_in_chunks() -> None:
    data = b"".join(b"line %06d " % index + b"x" * 88 + b"\n" for index in range(200_000))
    chunks = [data[index : index + 65_536] for index in range(0, len(data), 65_536)]

    lines = split_all(chunks)

    assert len(lines) == 200_000
    assert lines[0] == "line 000000 " + "x" * 88
    assert lines[-1] == "line 199999 " + "x" * 88


def test_splitter_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_line must be at least 21"):
        LineSplitter(max_line=20)
    with pytest.raises(ValueError, match=r"max_env_line \(50\) must be at least max_line \(100\)"):
        LineSplitter(max_line=100, max_env_line=50)
