"""``multipart/related`` bodies (RFC 2046 §5.1, PS3.18 8.7): split and write, no I/O.

:class:`Splitter` is fed bytes as they arrive and hands back each part once it
is whole; it never reads a socket, so the same code splits a stream read from
Orthanc piece by piece and a body held whole (:func:`split`).  A part with a
``Content-Length`` is taken by that length (and must be followed by CRLF and a
delimiter); one without it ends at the next delimiter.  Anything else (bad
framing, a part over ``max_part`` bytes, a body ending before its closing
delimiter) raises :class:`MultipartError`: for a DICOMweb answer that is a cut
or corrupt transfer, never a shorter answer.

The writer side is a few functions giving the exact bytes of part heads and
the closing delimiter, so that a length can be announced before anything is
sent (:func:`body_length`).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: Longest boundary or part-header line accepted.
MAX_LINE = 8192
#: Most header lines in one part.
MAX_HEADERS = 32
_BOUNDARY_RE = re.compile(r'boundary="?([^";,\s]+)"?', re.IGNORECASE)
_CRLF = b"\r\n"


class MultipartError(ValueError):
    """The body is not a well-formed, complete multipart (cut, corrupt or too big)."""


class PartTooLarge(MultipartError):
    """A part over the splitter's ``max_part``: well-formed, only too big to hold."""


@dataclass(frozen=True, slots=True)
class Part:
    """One part: its header lines as they came (name, value) and its body."""

    fields: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def headers(self) -> Mapping[str, str]:
        """The headers by lower-cased name."""
        return {name.lower(): value for name, value in self.fields}


def boundary_of(content_type: str) -> str | None:
    """The ``boundary`` parameter of a ``Content-Type``, or ``None``."""
    m = _BOUNDARY_RE.search(content_type)
    return m.group(1) if m else None


class Splitter:
    """Incremental splitter of one multipart body (see the module docstring)."""

    def __init__(self, boundary: str, *, max_part: int) -> None:
        if not boundary or len(boundary) > 200:
            raise MultipartError(f"unusable multipart boundary {boundary[:80]!r}")
        self._delim = b"--" + boundary.encode("latin-1")
        self._max_part = max_part
        self._buf = bytearray()
        self._state = "preamble"
        self._fields: list[tuple[str, str]] = []
        self._length: int | None = None
        self._preamble_lines = 0

    @property
    def done(self) -> bool:
        """The closing delimiter was seen."""
        return self._state == "done"

    def feed(self, data: bytes | bytearray | memoryview) -> list[Part]:
        """Take more bytes; return the parts they completed, in order."""
        if self._state == "done":
            if bytes(data).strip():
                raise MultipartError("bytes after the closing delimiter")
            return []
        self._buf += data
        parts: list[Part] = []
        while True:
            part = self._step()
            if part is None:
                break
            parts.append(part)
        return parts

    def end(self) -> None:
        """The body ended: raise unless its closing delimiter was seen."""
        if self._state == "delimiter" and bytes(self._buf).rstrip(b" \t\r") == self._delim + b"--":
            self._state = "done"  # the closing delimiter at the very end, without its CRLF
        if self._state != "done":
            raise MultipartError(f"multipart body cut short ({self._state})")

    # --- the state machine -------------------------------------------------------------
    def _line(self) -> bytes | None:
        at = self._buf.find(_CRLF, 0, MAX_LINE + 2)
        if at < 0:
            if len(self._buf) > MAX_LINE:
                raise MultipartError("line too long in a multipart body")
            return None
        line = bytes(self._buf[:at])
        del self._buf[:at + 2]
        return line

    def _delimiter(self, line: bytes) -> None:
        """A delimiter line: the next part, or the end."""
        if line.rstrip(b" \t") == self._delim + b"--":
            self._state = "done"
            self._buf.clear()  # an epilogue is ignored (RFC 2046)
        elif line.rstrip(b" \t") == self._delim:
            self._state = "headers"
            self._fields = []
        else:
            raise MultipartError(f"expected a multipart delimiter, found {line[:80]!r}")

    def _step(self) -> Part | None:
        """Advance as far as the buffer allows; the next whole part, or ``None``."""
        while self._state != "done":
            if self._state == "body":
                part = self._body()
                if part is not None:
                    return part
                if self._state == "body":
                    return None
                continue
            line = self._line()
            if line is None:
                return None
            if self._state == "headers":
                self._header(line)
            elif self._state == "delimiter" or line.startswith(self._delim):
                self._delimiter(line)
            else:  # a preamble line (RFC 2046 allows a few)
                self._preamble_lines += 1
                if self._preamble_lines > 8:
                    raise MultipartError("no multipart delimiter where the body starts")
        return None

    def _header(self, line: bytes) -> None:
        if line:
            if len(self._fields) >= MAX_HEADERS:
                raise MultipartError("too many part headers")
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise MultipartError(f"malformed part header {line[:80]!r}")
            self._fields.append((name.strip(), value.strip()))
            return
        declared = next((v for k, v in self._fields if k.lower() == "content-length"), None)
        self._length = None
        if declared is not None:
            if not declared.isdigit() or int(declared) > self._max_part:
                raise MultipartError(f"part with an unusable Content-Length ({declared[:20]!r})")
            self._length = int(declared)
        self._state = "body"

    def _body(self) -> Part | None:
        """The part's body once it is all here (its CRLF consumed), else ``None``."""
        if self._length is not None:
            need = self._length + 2 + len(self._delim)
            if len(self._buf) < need:
                return None
            if self._buf[self._length:need] != _CRLF + self._delim:
                raise MultipartError("a part is not followed by CRLF and a delimiter: "
                                     "its Content-Length is wrong")
            end = self._length
        else:
            end = self._buf.find(_CRLF + self._delim)
            if end < 0:
                if len(self._buf) > self._max_part + len(self._delim) + 2:
                    raise PartTooLarge(f"a part over {self._max_part} bytes")
                return None
        body = bytes(self._buf[:end])
        del self._buf[:end + 2]
        self._state = "delimiter"
        return Part(tuple(self._fields), body)


def split(body: bytes, content_type: str, *, max_part: int = 1 << 31) -> list[Part]:
    """Every part of a whole multipart body; :class:`MultipartError` unless it is complete."""
    boundary = boundary_of(content_type)
    if boundary is None:
        raise MultipartError(f"not a multipart answer: {content_type[:80]!r}")
    splitter = Splitter(boundary, max_part=max_part)
    parts = splitter.feed(body)
    splitter.end()
    return parts


# --- writing -----------------------------------------------------------------------------

def new_boundary() -> str:
    return secrets.token_hex(16)


def content_type(part_type: str, boundary: str) -> str:
    """The answer's ``Content-Type``: ``multipart/related; type="…"; boundary=…``."""
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def part_head(boundary: str, part_type: str, length: int,
              extra: Iterable[tuple[str, str]] = ()) -> bytes:
    """The delimiter and headers that go before a part's body."""
    lines = [f"--{boundary}", *(f"{k}: {v}" for k, v in extra),
             f"Content-Type: {part_type}", f"Content-Length: {length}", "MIME-Version: 1.0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


#: What follows each part's body.
PART_END = _CRLF


def closing(boundary: str) -> bytes:
    """The closing delimiter."""
    return f"--{boundary}--\r\n".encode("latin-1")


def body_length(boundary: str, part_type: str, sizes: Iterable[int]) -> int:
    """The exact length of a body of parts of ``sizes`` bytes (no extra headers)."""
    return sum(len(part_head(boundary, part_type, n)) + n + 2 for n in sizes) \
        + len(closing(boundary))


def rewrite(boundary: str, parts: Iterable[Part]) -> bytes:
    """A whole body of ``parts`` with their header lines as they are (names, order)."""
    out: list[bytes] = []
    for part in parts:
        head = "".join(f"{name}: {value}\r\n" for name, value in part.fields)
        out += [f"--{boundary}\r\n{head}\r\n".encode("latin-1"), part.body, PART_END]
    out.append(closing(boundary))
    return b"".join(out)


def write(boundary: str, part_type: str, bodies: Iterable[bytes],
          extra: Iterable[Iterable[tuple[str, str]]] | None = None) -> bytes:
    """A whole multipart body."""
    heads = iter(extra) if extra is not None else None
    out: list[bytes] = []
    for body in bodies:
        out += [part_head(boundary, part_type, len(body), next(heads) if heads else ()),
                body, PART_END]
    out.append(closing(boundary))
    return b"".join(out)
