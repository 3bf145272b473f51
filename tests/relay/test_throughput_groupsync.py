"""Group commit of the spool's directory fsync (relay/groupsync.py): who leads, who
shares, and that nothing returns before an fsync that began after its own rename."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest

from dicomcache.relay.groupsync import DONE, LEAD, WAIT, GroupSync, step
from dicomcache.relay.spool import InstanceInfo, Spool


@pytest.mark.parametrize(("finished", "round_running", "mine_is_next", "expected"), [
    (True, False, False, DONE),   # its round finished (another caller led it)
    (True, True, False, DONE),    # ... and the round after it runs already
    (False, False, True, LEAD),   # the round before ended: begin ours
    (False, True, True, WAIT),    # the round before still runs (it may not cover us)
    (False, True, False, WAIT),   # ours runs, led by another caller
    (False, False, False, WAIT),  # ours ends now (its leader is finishing)
])
def test_step(finished: bool, round_running: bool, mine_is_next: bool, expected: str) -> None:
    assert step(finished, round_running, mine_is_next) == expected


class _SlowSync:
    """An fsync that blocks until released, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.started = threading.Event()
        self.release = threading.Event()
        #: Calls (1, 2, …) that fail with EIO.
        self.failing: set[int] = set()

    def __call__(self) -> None:
        self.calls += 1
        call = self.calls
        self.started.set()
        assert self.release.wait(10)
        if call in self.failing:
            raise OSError(errno.EIO, "I/O error")


def _run(group: GroupSync, outcomes: list[object], index: int) -> None:
    try:
        group.sync()
        outcomes[index] = "ok"
    except OSError as exc:
        outcomes[index] = exc


def _wait_for(predicate: object, what: str) -> None:
    for _ in range(1000):
        if predicate():  # type: ignore[operator]
            return
        threading.Event().wait(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def test_callers_arriving_during_a_round_share_the_next_one() -> None:
    fsync = _SlowSync()
    group = GroupSync(fsync)
    outcomes: list[object] = [None] * 5
    first = threading.Thread(target=_run, args=(group, outcomes, 0))
    first.start()
    assert fsync.started.wait(10)
    # Four more renames while the first fsync runs: none may return with it.
    late = [threading.Thread(target=_run, args=(group, outcomes, i)) for i in range(1, 5)]
    for t in late:
        t.start()
    _wait_for(lambda: group.calls == 5, "the four late callers")
    assert outcomes == [None] * 5
    fsync.started.clear()
    fsync.release.set()  # the first round ends; the four share one more
    for t in [first, *late]:
        t.join(10)
    assert outcomes == ["ok"] * 5
    assert fsync.calls == 2
    assert group.rounds == 2


def test_a_failed_round_fails_every_caller_it_covered_and_the_next_round_is_fresh() -> None:
    fsync = _SlowSync()
    fsync.failing = {2}  # the second round (covering both followers) fails
    group = GroupSync(fsync)
    outcomes: list[object] = [None] * 3
    leader = threading.Thread(target=_run, args=(group, outcomes, 0))
    leader.start()
    assert fsync.started.wait(10)
    followers = [threading.Thread(target=_run, args=(group, outcomes, i)) for i in (1, 2)]
    for t in followers:
        t.start()
    _wait_for(lambda: group.calls == 3, "the followers")
    fsync.release.set()
    leader.join(10)
    assert outcomes[0] == "ok"
    for t in followers:
        t.join(10)
    assert all(isinstance(o, OSError) and o.errno == errno.EIO for o in outcomes[1:]), outcomes
    assert fsync.calls == 2
    group.sync()  # a later rename gets a round of its own
    assert fsync.calls == 3


def _info(n: int) -> InstanceInfo:
    return InstanceInfo("1.2.3", "1.2.840.10008.5.1.4.1.1.2", f"1.2.3.4.{n}",
                        "1.2.840.10008.1.2.1")


def test_a_failed_directory_fsync_leaves_nothing_queued_or_spooled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not acknowledged (put raises): neither a row nor a file the next start would queue."""
    spool = Spool(tmp_path / "spool", ["PACS"])
    spool.open()
    try:
        spool.put(b"DICM-one", _info(1))

        def failing() -> None:
            raise OSError(errno.EIO, "I/O error")

        monkeypatch.setattr(spool.objects_sync, "_sync", failing)
        with pytest.raises(OSError) as err:
            spool.put(b"DICM-two", _info(2))
        assert err.value.errno == errno.EIO
        assert len(list(spool.objects.iterdir())) == 1
        assert list(spool.incoming.iterdir()) == []
        assert spool.snapshot()["destinations"]["PACS"]["queue_depth"] == 1
    finally:
        spool.close()


def test_concurrent_puts_share_directory_fsyncs_and_all_are_queued(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", ["PACS"])
    spool.open()
    try:
        ids: list[int] = []
        lock = threading.Lock()

        def put(n: int) -> None:
            got = spool.put(b"x" * 65536, _info(n))
            with lock:
                ids.append(got)

        threads = [threading.Thread(target=put, args=(n,)) for n in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(ids) == 32
        assert len(list(spool.objects.iterdir())) == 32
        assert spool.snapshot()["destinations"]["PACS"]["queue_depth"] == 32
        assert spool.objects_sync.calls == 32
        assert 1 <= spool.objects_sync.rounds <= 32
    finally:
        spool.close()
