"""Parts of dicomcache.dicomweb.series_stream: the multipart splitter, the commit budget, the MD5 lookups."""

from __future__ import annotations

import asyncio
import hashlib
import io

import pytest

from dicomcache.config import UpstreamSettings
from dicomcache.metrics import Metrics
from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.dicomweb.series_stream import (MAX_LINE, Budget, StreamBroken, _look_up_md5s, _Thread,
                                      split_parts)
from dicomcache.upstream.client import OrthancClient
from dicomcache.devtools.wanem import LinkProfile, WanEmulator
from tests.conftest import Sample


def multipart(bodies: list[bytes], *, close: bool = True) -> bytes:
    out = b"".join(b"--B\r\nContent-Type: application/dicom\r\nContent-Length: %d\r\n\r\n%b\r\n"
                   % (len(b), b) for b in bodies)
    return out + (b"--B--\r\n" if close else b"")


def collect(data: bytes) -> list[tuple[int, bytes]]:
    # BufferedReader behaves as http.client's response does: short reads only at EOF.
    return list(split_parts(io.BufferedReader(io.BytesIO(data)), "B"))  # type: ignore[arg-type]


def test_split_parts_splits_by_content_length() -> None:
    bodies = [b"x" * 10, b"--B\r\n inside a body is data", b""]
    assert collect(multipart(bodies)) == [(len(b), b) for b in bodies]


def test_split_parts_takes_a_preamble_and_a_closing_boundary_without_crlf() -> None:
    data = b"preamble\r\n" + multipart([b"abc"])[:-2]
    assert collect(data) == [(3, b"abc")]


@pytest.mark.parametrize("cut", [
    lambda d: d[:-len(b"--B--\r\n")],        # no closing boundary
    lambda d: d[:40],                          # inside a part
    lambda d: d.replace(b"Content-Length: 10\r\n", b""),  # a part without its length
    lambda d: d.replace(b"Content-Length: 10", b"Content-Length: 11"),  # a lying length
    lambda d: d[:-len(b"--B--\r\n")] + b"--B\r\n",  # a part begun, never sent
    lambda d: d.replace(b"--B\r\n", b"--B\r\n" + b"X: " + b"y" * MAX_LINE + b"\r\n", 1),
])
def test_split_parts_never_passes_a_cut_stream_as_complete(cut) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StreamBroken):
        collect(cut(multipart([b"x" * 10, b"y" * 20])))


async def test_budget_lets_one_in_and_waits_while_over_the_limit() -> None:
    budget = Budget(100)
    await budget.take(500)  # bigger than the limit: let in when nothing is held
    second = asyncio.ensure_future(budget.take(10))
    await asyncio.sleep(0)
    assert not second.done()  # over the limit: waits for room
    budget.give_back(500)
    await asyncio.wait_for(second, 1)
    await budget.take(90)  # 10 + 90 fits exactly
    third = asyncio.ensure_future(budget.take(1))
    await asyncio.sleep(0)
    assert not third.done() and budget.held == 100
    budget.give_back(90)
    await asyncio.wait_for(third, 1)
    assert budget.held == 11


async def test_md5_lookups_skip_instances_without_one_and_stop_when_refused(
        orthanc: OrthancProcess, ct_series: list[Sample], wan: WanEmulator) -> None:
    """The lookup thread: a 404 leaves that instance out; any other refusal ends it."""
    client = OrthancClient(UpstreamSettings(
        url=f"http://127.0.0.1:{wan.port}", username=orthanc.username,
        password=orthanc.password), Metrics())
    try:
        oids = [ct_series[0].orthanc_id, "00000000-00000000-00000000-00000000-00000000",
                ct_series[1].orthanc_id]
        learnt: dict[str, str] = {}
        thread = _Thread(client, "test-md5")
        error = await thread.run(
            lambda post: _look_up_md5s(thread, oids, post, lambda pairs: learnt.update(pairs)))
        assert error is None
        assert learnt == {s.orthanc_id: hashlib.md5(s.data).hexdigest() for s in ct_series[:2]}

        wan.set_profile(LinkProfile(status_503=1.0, fault_paths=r"/attachments/dicom/md5$"))
        learnt.clear()
        thread = _Thread(client, "test-md5")
        error = await thread.run(
            lambda post: _look_up_md5s(thread, oids, post, lambda pairs: learnt.update(pairs)))
        assert isinstance(error, StreamBroken) and "503" in str(error)
        assert learnt == {}
        assert wan.faults["status_503"] >= 1  # the first refusal ended the lookups
    finally:
        await client.close()
