"""A JSON array read one element at a time from a byte stream, in bounded memory (stdlib only).

The records file of a dataset can be gigabytes; `json.loads` on it holds the text and every record at
once. `iter_array` keeps at most one element (up to `max_element_chars`) plus one read chunk in memory,
decodes UTF-8 incrementally, and parses each element with the C scanner of `json`.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

_WS = re.compile(r"[ \t\n\r]*")
CHUNK = 1024 * 1024


class JsonStreamError(ValueError):
    """The stream is not one JSON array within the limits; `code` is the API error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Reader:
    """A decoded text window over the stream: `buf[pos:]` is unread text; `line` counts consumed lines."""

    def __init__(self, stream: BinaryIO, name: str) -> None:
        self.stream, self.name = stream, name
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.eof, self.line, self.offset = "", 0, False, 1, 0

    def fill(self) -> bool:
        """Drop consumed text, append the next chunk; False at end of stream."""
        if self.eof:
            return False
        consumed = self.buf[: self.pos]
        self.line += consumed.count("\n")
        self.offset += len(consumed)
        self.buf, self.pos = self.buf[self.pos :], 0
        data = self.stream.read(CHUNK)
        try:
            self.buf += self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise JsonStreamError("malformed_json", f"{self.name}: not valid UTF-8: {exc.reason}") from None
        self.eof = not data
        return True

    def skip_ws(self) -> str:
        """The next non-whitespace character ('' at end of stream), not consumed."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self.fill():
                return self.buf[self.pos : self.pos + 1]

    def where(self, pos: int | None = None) -> str:
        pos = self.pos if pos is None else pos
        return f"line {self.line + self.buf.count(chr(10), 0, pos)} (character {self.offset + pos + 1})"

    def error(self, message: str, pos: int | None = None) -> JsonStreamError:
        return JsonStreamError("malformed_json", f"{self.name}: invalid JSON at {self.where(pos)}: {message}")


def _too_large(reader: _Reader, index: int, max_chars: int) -> JsonStreamError:
    return JsonStreamError(
        "record_too_large",
        f"{reader.name}: record {index} is longer than the limit of {max_chars} characters (max_record_bytes)",
    )


def _element(reader: _Reader, decoder: json.JSONDecoder, index: int, max_chars: int) -> Any:
    """Parse the element at `reader.pos`, reading more of the stream while it may be incomplete."""
    while True:
        start = reader.pos
        try:
            value, end = decoder.raw_decode(reader.buf, start)
        except json.JSONDecodeError as exc:
            truncated = exc.pos >= len(reader.buf) - 16 or exc.msg.startswith("Unterminated string")
            if not truncated or reader.eof:
                raise reader.error(exc.msg, exc.pos) from None
            if len(reader.buf) - start > max_chars:
                raise _too_large(reader, index, max_chars) from None
            reader.fill()
            continue
        except RecursionError:
            raise JsonStreamError(
                "malformed_json", f"{reader.name}: record {index} is nested too deeply to be a record"
            ) from None
        if end == len(reader.buf) and not reader.eof:  # a number or literal may go on in the next chunk
            reader.fill()
            continue
        if end - start > max_chars:
            raise _too_large(reader, index, max_chars)
        reader.pos = end
        return value


def iter_array(stream: BinaryIO, *, name: str, max_element_chars: int) -> Iterator[Any]:
    """Yield the elements of the JSON array that is the whole stream; JsonStreamError names the problem."""
    reader = _Reader(stream, name)
    decoder = json.JSONDecoder()
    first = reader.skip_ws()
    if first != "[":
        if first == "":
            raise JsonStreamError("malformed_json", f"{name}: the file is empty")
        raise JsonStreamError("malformed_json", f"{name}: top level must be a list of records")
    reader.pos += 1
    if reader.skip_ws() == "]":
        reader.pos += 1
    else:
        index = 0
        while True:
            if reader.skip_ws() == "":
                raise reader.error("the list is not closed")
            yield _element(reader, decoder, index, max_element_chars)
            index += 1
            sep = reader.skip_ws()
            if sep == "]":
                reader.pos += 1
                break
            if sep != ",":
                raise reader.error("expected ',' or ']' after a record" if sep else "the list is not closed")
            reader.pos += 1
    if reader.skip_ws() != "":
        raise reader.error("extra data after the list")
