"""dicomcache.dicom.multipart: the splitter never passes a cut or corrupt body as complete."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dicomcache.dicom import multipart
from dicomcache.dicom.multipart import MAX_LINE, MultipartError, Splitter


def body(bodies: list[bytes], *, close: bool = True) -> bytes:
    out = b"".join(b"--B\r\nContent-Type: application/dicom\r\nContent-Length: %d\r\n\r\n%b\r\n"
                   % (len(b), b) for b in bodies)
    return out + (b"--B--\r\n" if close else b"")


def collect(data: bytes, step: int = 0) -> list[tuple[int, bytes]]:
    """Split ``data`` fed whole, or ``step`` bytes at a time (as a socket delivers it)."""
    splitter = Splitter("B", max_part=1 << 20)
    parts: list[multipart.Part] = []
    for i in range(0, len(data), step or len(data) or 1):
        parts += splitter.feed(data[i:i + (step or len(data))])
    splitter.end()
    return [(int(p.headers["content-length"]), p.body) for p in parts]


@pytest.mark.parametrize("step", [0, 1, 7, 4096])
def test_splits_by_content_length(step: int) -> None:
    bodies = [b"x" * 10, b"--B\r\n inside a body is data", b""]
    assert collect(body(bodies), step) == [(len(b), b) for b in bodies]


def test_takes_a_preamble_and_a_closing_boundary_without_crlf() -> None:
    data = b"preamble\r\n" + body([b"abc"])[:-2]
    assert collect(data) == [(3, b"abc")]


def test_parts_without_a_length_end_at_the_next_delimiter() -> None:
    data = b"--B\r\nContent-Type: x\r\n\r\nhello\r\n--B\r\n\r\nworld\r\n--B--\r\n"
    assert [p.body for p in multipart.split(data, "multipart/related; boundary=B")] == \
        [b"hello", b"world"]


CUTS: list[Callable[[bytes], bytes]] = [
    lambda d: d[:-len(b"--B--\r\n")],        # no closing boundary
    lambda d: d[:40],                          # inside a part
    lambda d: d.replace(b"Content-Length: 10", b"Content-Length: 11"),  # a lying length
    lambda d: d[:-len(b"--B--\r\n")] + b"--B\r\n",  # a part begun, never sent
    lambda d: d.replace(b"--B\r\n", b"--B\r\n" + b"X: " + b"y" * MAX_LINE + b"\r\n", 1),
]


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("step", [0, 1, 13])
def test_never_passes_a_cut_stream_as_complete(cut: Callable[[bytes], bytes], step: int) -> None:
    with pytest.raises(MultipartError):
        collect(cut(body([b"x" * 10, b"y" * 20])), step)


def test_a_part_over_the_bound_is_refused() -> None:
    splitter = Splitter("B", max_part=5)
    with pytest.raises(MultipartError):
        splitter.feed(body([b"x" * 10]))


def test_written_bodies_split_back_and_announce_their_length() -> None:
    b = multipart.new_boundary()
    parts = [b"abc", b"", bytes(range(256)) * 4]
    whole = multipart.write(b, "application/dicom", parts)
    assert len(whole) == multipart.body_length(b, "application/dicom", [len(p) for p in parts])
    ctype = multipart.content_type("application/dicom", b)
    assert [p.body for p in multipart.split(whole, ctype)] == parts
    assert multipart.boundary_of(ctype) == b
