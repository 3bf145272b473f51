"""The /changes watcher against the real Orthanc (through the WAN emulator, to count requests)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomcache.config import PrewarmRule, Settings
from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.devtools.wanem import WanEmulator
from dicomcache.http.app import make_app
from dicomcache.http.keys import CHANGES, PREFETCHER, STORE, STUDY_CHANGED
from dicomcache.upstream.changes import StudyEvent, read_cursor, rule_matches, write_cursor
from tests.conftest import SettingsFactory, eventually


async def upload(orthanc: OrthancProcess, n: int = 1, *, study: str | None = None,
                 modality: str = "CT", seed: int = 0) -> tuple[str, list[str]]:
    return await asyncio.to_thread(_upload, orthanc, n, study, modality, seed)


def _upload(orthanc: OrthancProcess, n: int, study: str | None, modality: str,
            seed: int) -> tuple[str, list[str]]:
    datasets = make_ct_series(n, rows=32, columns=32, study_uid=study or generate_uid(),
                              seed=seed, patient_id="PCHANGES", modality=modality)
    ids = orthanc.upload([encode(ds, ExplicitVRLittleEndian) for ds in datasets])
    return str(datasets[0].StudyInstanceUID), ids


async def started(settings: Settings, seen: list[str]) -> TestClient:
    app = make_app(settings)

    async def hook(event: StudyEvent) -> None:
        assert event.study_uid is not None
        seen.append(event.study_uid)

    app[STUDY_CHANGED].append(hook)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_hooks_and_cursor_survive_restart(
        make_settings: SettingsFactory, orthanc: OrthancProcess, wan: WanEmulator,
        tmp_path: Path) -> None:
    settings = make_settings(url=f"http://127.0.0.1:{wan.port}",
                             changes={"enabled": True, "poll_interval": 0.1})
    seen: list[str] = []
    client = await started(settings, seen)
    try:
        watcher = client.app[CHANGES]
        await eventually(lambda: watcher.cursor is not None, timeout=15, what="a first cursor")
        study, _ = await upload(orthanc, seed=11)
        await eventually(lambda: study in seen, timeout=15, what="the hook for a new study")
        # A new instance in a study seen before: its subscribers hear of it again.
        seen.clear()
        await upload(orthanc, study=study, seed=12)
        await eventually(lambda: study in seen, timeout=15, what="the hook for a known study")
    finally:
        await client.close()
    # What was persisted is where the watcher stood when it stopped (it may have
    # read further changes after the one awaited above).
    saved = watcher.cursor
    cursor_file = settings.cache.directory / "changes-cursor.json"
    assert await asyncio.to_thread(read_cursor, cursor_file, settings.upstream.url or "") == saved
    assert wan.targets.count("/changes?last") == 1

    # Changes made while dicomcache is stopped are not lost: it resumes at the cursor.
    missed, _ = await upload(orthanc, seed=13)
    seen2: list[str] = []
    client = await started(settings, seen2)
    try:
        # before StableStudy could tell
        await eventually(lambda: missed in seen2, timeout=1.5, what="the change made while stopped")
        assert wan.targets.count("/changes?last") == 1
        assert any(t.startswith(f"/changes?since={saved}&") for t in wan.targets)
    finally:
        await client.close()


async def test_a_cursor_that_cannot_be_saved_is_followed_from_memory(
        make_settings: SettingsFactory, orthanc: OrthancProcess, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The cursor lives in the cache directory: on a full or read-only disk (the cache
    degraded) the feed is still followed, with one warning, not a traceback a poll."""
    (tmp_path / "a-file").write_text("x")
    settings = make_settings(changes={"enabled": True, "poll_interval": 0.1,
                                      "cursor_file": str(tmp_path / "a-file" / "cursor.json")})
    seen: list[str] = []
    client = await started(settings, seen)
    try:
        watcher = client.app[CHANGES]
        await eventually(lambda: watcher.cursor is not None, timeout=15, what="a first cursor")
        study, _ = await upload(orthanc, seed=31)
        await eventually(lambda: study in seen, timeout=15, what="the hook for a new study")
        first = watcher.cursor
        await upload(orthanc, study=study, seed=32)
        await eventually(lambda: (watcher.cursor or 0) > (first or 0), timeout=15,
                         what="the cursor moving on")
    finally:
        await client.close()
    assert caplog.text.count("cannot save the cursor") == 1
    assert "batch failed" not in caplog.text and "Traceback" not in caplog.text


async def test_prewarm_rule_fetches_a_matching_stable_study(
        make_settings: SettingsFactory, orthanc: OrthancProcess) -> None:
    settings = make_settings(changes={"enabled": True, "poll_interval": 0.2,
                                      "prewarm": [{"modality": "MR"}]})
    client = await started(settings, [])
    try:
        watcher = client.app[CHANGES]
        await eventually(lambda: watcher.cursor is not None, timeout=15, what="a first cursor")
        ct, _ = await upload(orthanc, 2, modality="CT", seed=21)
        mr, ids = await upload(orthanc, 3, modality="MR", seed=22)
        # after Orthanc's StableAge
        await eventually(lambda: mr in watcher.warmed, timeout=20, what="the MR study pre-warmed")
        assert await client.app[PREFETCHER].idle(20)
        store = client.app[STORE]
        assert all([await store.get(i) for i in ids])
        assert ct not in watcher.warmed
    finally:
        await client.close()


@pytest.mark.parametrize(("rule", "ok"), [
    (PrewarmRule(modality="mr"), True),
    (PrewarmRule(modality="CT"), False),
    (PrewarmRule(label="urgent"), True),
    (PrewarmRule(label="other"), False),
    (PrewarmRule(tag="InstitutionName", value="CLINIC A"), True),
    (PrewarmRule(tag="InstitutionName", value="CLINIC B"), False),
    (PrewarmRule(modality="MR", tag="InstitutionName", value="CLINIC B"), False),
])
def test_rule_matches(rule: PrewarmRule, ok: bool) -> None:
    study = {"Labels": ["urgent"]}
    assert rule_matches(rule, study, {"MR", "SR"}, {"InstitutionName": "CLINIC A "}) is ok


def test_cursor_of_another_orthanc_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    assert read_cursor(path, "http://a") is None
    write_cursor(path, "http://a", 42)
    assert read_cursor(path, "http://a") == 42
    assert read_cursor(path, "http://b") is None
    path.write_text("{broken")
    assert read_cursor(path, "http://a") is None


async def test_stop_during_a_cursor_write_waits_for_it(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped while the cursor is being written: the write completes before the stop
    does, and the file says where the watcher stands (CI once found them apart)."""
    import threading
    from types import SimpleNamespace

    from dicomcache.config import ChangesSettings
    from dicomcache.metrics import Metrics
    from dicomcache.upstream import changes

    started_, release = threading.Event(), threading.Event()

    def slow_write(path: Path, upstream: str, last: int) -> None:
        started_.set()
        assert release.wait(10)
        write_cursor(path, upstream, last)

    async def get_json(path: str, **_kw: object) -> dict[str, int]:
        assert path == "/changes?last"  # no cursor yet: start at Orthanc's last change
        return {"Last": 7}

    monkeypatch.setattr(changes, "write_cursor", slow_write)
    path = tmp_path / "cursor.json"
    # A stand-in for the Orthanc client: its base URL and the answer to /changes?last.
    client: Any = SimpleNamespace(base="http://o", get_json=get_json)
    watcher = changes.ChangeWatcher(ChangesSettings(), client, Metrics(), path, [])
    saving = asyncio.ensure_future(watcher.poll_once())  # reads Last, then writes the cursor
    assert await asyncio.to_thread(started_.wait, 10)
    saving.cancel()  # stop() while the thread writes
    # Time passing, not synchronisation: the write goes on for a while after the stop,
    # so a stop that did not wait for it would come back first.
    threading.Timer(0.2, release.set).start()
    with pytest.raises(asyncio.CancelledError):
        await saving
    assert await asyncio.to_thread(read_cursor, path, "http://o") == watcher.cursor == 7


@pytest.mark.parametrize(("cursor", "seqs", "last", "restarted", "gap"), [
    (10, [11, 12, 13], 13, False, None),            # in order: nothing missed
    (10, [], 10, False, None),
    (10, [14, 15], 15, False, "changes 11–13 are gone"),  # deleted resources' changes
    (10, [11, 13], 13, False, "changes 12–12 are gone"),  # a hole inside the batch
    (10, [], 3, False, "history restarted"),        # Orthanc's database replaced
    (10, [11], 11, True, "dicomcache restarted"),
])
def test_feed_gap(cursor: int, seqs: list[int], last: int, restarted: bool,
                  gap: str | None) -> None:
    from dicomcache.upstream.changes import feed_gap

    found = feed_gap(cursor, [{"Seq": s} for s in seqs], last, restarted=restarted)
    assert (found is None) if gap is None else (found is not None and gap in found)
