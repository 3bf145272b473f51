"""Parts of dicomcache.dicomweb.series_stream: the commit budget, the MD5 lookups."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from dicomcache.config import UpstreamSettings
from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.devtools.wanem import LinkProfile, WanEmulator
from dicomcache.dicomweb.series_stream import Budget, look_up_md5s
from dicomcache.metrics import Metrics
from dicomcache.upstream.client import OrthancClient
from tests.conftest import Sample


async def test_budget_lets_one_in_and_waits_while_over_the_limit() -> None:
    budget = Budget(100)
    await budget.take(500)  # bigger than the limit: let in when nothing is held
    second = asyncio.ensure_future(budget.take(10))
    await asyncio.sleep(0)  # one loop pass: the take runs up to its wait
    assert not second.done()  # over the limit: waits for room
    budget.give_back(500)
    await asyncio.wait_for(second, 1)
    await budget.take(90)  # 10 + 90 fits exactly
    third = asyncio.ensure_future(budget.take(1))
    await asyncio.sleep(0)  # one loop pass: the take runs up to its wait
    assert not third.done() and budget.held == 100
    budget.give_back(90)
    await asyncio.wait_for(third, 1)
    assert budget.held == 11


async def test_md5_lookups_skip_instances_without_one_and_stop_when_refused(
        orthanc: OrthancProcess, ct_series: list[Sample], wan: WanEmulator) -> None:
    """A 404 leaves that instance out; any other refusal ends the lookups."""
    client = OrthancClient(UpstreamSettings(
        url=f"http://127.0.0.1:{wan.port}", username=orthanc.username,
        password=orthanc.password), Metrics())
    try:
        oids = [ct_series[0].orthanc_id, "00000000-00000000-00000000-00000000-00000000",
                ct_series[1].orthanc_id]
        learnt: dict[str, str] = {}
        await look_up_md5s(client, oids, learnt.__setitem__, Metrics())
        assert learnt == {s.orthanc_id: hashlib.md5(s.data).hexdigest() for s in ct_series[:2]}

        wan.set_profile(LinkProfile(status_503=1.0, fault_paths=r"/attachments/dicom/md5$"))
        learnt.clear()
        with pytest.raises(ExceptionGroup) as ended:
            await look_up_md5s(client, oids, learnt.__setitem__, Metrics())
        assert "503" in str(ended.value.exceptions[0])
        assert learnt == {}
        assert wan.faults["status_503"] >= 1  # the first refusal ended the lookups
    finally:
        await client.close()
