"""Group commit of the spool's directory: one fsync for every rename waiting on it.

A received instance is acknowledged only once its file is durable: written,
fsynced, renamed into ``objects/``, and the directory fsynced (the rename
is durable only then).  Each association writes, fsyncs and renames its
own file in its own thread; the directory's fsync is what they can share.
An fsync of a directory makes durable every rename into it done before the
fsync began, so C-STOREs that finish their rename while one runs wait for
the next and share it: several modalities sending at once cost one or two
directory fsyncs (a disk cache flush each) per round instead of one each.

Every caller still returns only after an fsync that *began after its own
rename* succeeded: nothing is acknowledged earlier than without the group
(one association alone sees no change: it leads every round).

A failed fsync fails every caller it was to cover: after a failed fsync
Linux may report the next one clean although the data never reached the
disk, so none of that round is acknowledged (each answers 0xA700 and the
modality resends).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Final, Literal

Step = Literal["done", "lead", "wait"]
DONE: Final = "done"
LEAD: Final = "lead"
WAIT: Final = "wait"


def step(finished: bool, round_running: bool, mine_is_next: bool) -> Step:
    """What a caller waiting for its round does (its round: the one that was running
    when it arrived, if none was; else the next one, not yet begun, which all later
    arrivals share).

    * ``done``: its round has finished (return, or raise its error);
    * ``lead``: no round runs and its round is the next one: begin it (run the fsync);
    * ``wait``: until a round finishes.
    """
    if finished:
        return DONE
    if not round_running and mine_is_next:
        return LEAD
    return WAIT


class _Round:
    __slots__ = ("error", "finished")

    def __init__(self) -> None:
        self.finished = False
        self.error: BaseException | None = None


class GroupSync:
    """Shares ``sync()`` (an fsync of one directory) between the threads that ask at once.

    ``sync`` is called after the caller's own change (a rename into the
    directory); it returns once a successful call of ``sync`` that began after
    that change has finished, and raises that call's error if it failed.
    """

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._cond = threading.Condition()
        self._running: _Round | None = None
        #: The round not begun yet that callers arriving during a round share.
        self._next: _Round | None = None
        #: Calls and rounds run (fsyncs saved = calls - rounds): tests, the benchmark.
        self.calls = 0
        self.rounds = 0

    def sync(self) -> None:
        with self._cond:
            self.calls += 1
            if self._running is None and self._next is None:
                mine = self._running = _Round()
            else:
                mine = self._next = self._next or _Round()
                while (now := step(mine.finished, self._running is not None,
                                   self._next is mine)) == WAIT:
                    self._cond.wait()
                if now == DONE:
                    if mine.error is not None:
                        raise _shared_failure(mine.error)
                    return
                self._running, self._next = mine, None
            self.rounds += 1
        try:
            self._sync()
        except BaseException as exc:
            mine.error = exc
            raise
        finally:
            with self._cond:
                mine.finished = True
                self._running = None
                self._cond.notify_all()


def _shared_failure(error: BaseException) -> OSError:
    """The error a caller of a failed round raises (its own object: the round's leader
    raises the original)."""
    code = error.errno if isinstance(error, OSError) and error.errno else errno.EIO
    failure = OSError(code, f"directory fsync (shared) failed: {error}")
    failure.__cause__ = error
    return failure
