"""``Range`` requests on an instance body (RFC 9110 §14): a pure decision, no I/O.

dicomcache serves single byte ranges (what viewers and download managers ask);
a multi-range request is answered with the whole body, as RFC 9110 allows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Span:
    """The bytes to send: ``count`` from ``start``; ``partial`` for a 206."""

    start: int
    count: int
    partial: bool

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.start + self.count - 1}/{size}"


#: The range cannot be satisfied: answer 416 with ``Content-Range: bytes */size``.
UNSATISFIABLE = None


def plan(header: str | None, size: int) -> Span | None:
    """What to send of a ``size``-byte body for a ``Range`` header (``None`` or not
    ``bytes=``: the whole body; :data:`UNSATISFIABLE` (``None``) for a 416).

    >>> plan("bytes=0-3", 10)
    Span(start=0, count=4, partial=True)
    >>> plan("bytes=-0", 10) is UNSATISFIABLE
    True
    """
    whole = Span(0, size, False)
    if header is None:
        return whole
    m = _RANGE.match(header)
    if m is None:
        return whole  # several ranges, another unit, or garbage: RFC 9110 lets us ignore it
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return whole
    if not first:  # a suffix: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            return UNSATISFIABLE
        start = max(size - suffix, 0)
        return Span(start, size - start, True)
    start = int(first)
    if start >= size:
        return UNSATISFIABLE
    end = min(int(last), size - 1) if last else size - 1
    if end < start:
        return whole  # an invalid range-spec is ignored (RFC 9110 §14.1.1)
    return Span(start, end - start + 1, True)
