"""Event-driven waits for pynetdicom's reactors (instead of 1 ms polling), whole-PDU reads.

pynetdicom 3.0.4 polls: its DUL thread sleeps 1 ms whenever it finds nothing
to do, its association thread sleeps 1 ms per loop, and a PDU is read 4 KiB
per ``recv`` call.  Per C-STORE that costs several sleeps on both sides (the
SCP: PDUs arrive → message complete → handler → response queued → sent; the
SCU: pause the reactor → send → response), a few milliseconds per instance
that a modality waiting for each acknowledgement feels directly, and more on
a loaded machine where a sleeping thread is not rescheduled at once.

:func:`install` replaces, process-wide and only for the pynetdicom version
these were written against (otherwise it does nothing):

* ``DULServiceProvider.run_reactor``: the same loop, but its idle wait is a
  ``select`` on the socket and on an ``eventfd`` that :meth:`send_pdu` and
  :meth:`kill_dul` signal (at most 50 ms, for the ARTIM timer);
* ``Association._run_reactor``: the same loop, but its 1 ms sleep is a wait
  on the DIMSE message queue (a complete message wakes it; so does a
  ``send_*`` pausing the reactor, through the checkpoint event; at most
  10 ms, for release/abort/idle checks);
* ``AssociationSocket.recv``: ``recv_into`` one buffer of the PDU's size.

State machine, PDU handling and the pause protocol are untouched: only how
long a thread waits when it has nothing to do changes.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading
import time
from typing import Any

import pynetdicom
from pynetdicom import dul as _dul
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket

log = logging.getLogger(__name__)

#: The pynetdicom versions whose reactor loops these replacements mirror.
SUPPORTED = ("3.0.4",)
#: Longest idle wait of the DUL thread (it checks the ARTIM timer between waits).
DUL_IDLE = 0.05
#: Longest idle wait of the association thread (release/abort/idle-timeout checks).
REACTOR_IDLE = 0.01

_installed = False
_install_lock = threading.Lock()


class _Waker:
    """An eventfd (a pipe where there is none) that wakes a DUL thread's ``select``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        if hasattr(os, "eventfd"):
            self.rfd = self.wfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - non-Linux
            self.rfd, self.wfd = os.pipe()
            os.set_blocking(self.rfd, False)
            os.set_blocking(self.wfd, False)
        self.closed = False
        #: True while the DUL thread sleeps in select(): only then is a write needed.
        self.waiting = False

    def wake(self) -> None:
        if not self.waiting:
            return
        with self._lock:
            if self.closed:
                return
            try:
                os.write(self.wfd, (1).to_bytes(8, "little"))
            except OSError:  # full (a wake-up is pending anyway)
                pass

    def drain(self) -> None:
        try:
            os.read(self.rfd, 4096)
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            os.close(self.rfd)
            if self.wfd != self.rfd:
                os.close(self.wfd)


def _waker(dul: Any) -> _Waker:
    waker = dul.__dict__.get("_dc_waker")
    if waker is None:
        with _install_lock:
            waker = dul.__dict__.get("_dc_waker")
            if waker is None:
                waker = dul._dc_waker = _Waker()
    return waker  # type: ignore[no-any-return]


def _idle_wait(dul: Any, waker: _Waker) -> None:
    """Sleep until the socket is readable, something is queued to send, or DUL_IDLE."""
    fds: list[int] = [waker.rfd]
    sock = dul.socket
    raw = getattr(sock, "socket", None) if sock is not None else None
    if raw is not None and getattr(sock, "_is_connected", False):
        if hasattr(raw, "pending"):  # TLS: buffered bytes select cannot see; poll as before
            time.sleep(dul._run_loop_delay)
            return
        try:
            fds.append(raw.fileno())
        except OSError:
            pass
        if fds[-1] < 0:
            fds.pop()
    # Set before looking at the queue: a send_pdu() after this look writes the eventfd.
    waker.waiting = True
    try:
        if dul.to_provider_queue.qsize() or dul.event_queue.qsize() or dul._kill_thread:
            return
        try:
            ready, _, _ = select.select(fds, [], [], DUL_IDLE)
        except (OSError, ValueError):  # socket closed under us: the loop notices
            time.sleep(dul._run_loop_delay)
            return
    finally:
        waker.waiting = False
    if waker.rfd in ready:
        waker.drain()


def _dul_run_reactor(self: Any) -> None:
    """pynetdicom 3.0.4's ``DULServiceProvider.run_reactor`` with an event-driven idle wait."""
    waker = _waker(self)
    self._idle_timer.start()
    sleep = False
    try:
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True

            if sleep:
                _idle_wait(self, waker)

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                _dul.LOGGER.error("Exception in DUL.run(), aborting association")
                _dul.LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            self.state_machine.do_action(event)
            sleep = False
    finally:
        waker.close()


_orig_send_pdu = _dul.DULServiceProvider.send_pdu
_orig_kill_dul = _dul.DULServiceProvider.kill_dul


def _dul_send_pdu(self: Any, primitive: Any) -> None:
    _orig_send_pdu(self, primitive)
    _waker(self).wake()


def _dul_kill_dul(self: Any) -> None:
    _orig_kill_dul(self)
    _waker(self).wake()


def _dul_stop_dul(self: Any) -> bool:
    """``stop_dul`` that wakes the DUL thread instead of waiting for its next poll."""
    if self.state_machine.current_state == "Sta1":
        self._kill_thread = True
        _waker(self).wake()
        while self.is_alive():
            time.sleep(self._run_loop_delay)
        return True
    return False


class _Checkpoint(threading.Event):
    """The association's reactor checkpoint; clearing it (a ``send_*`` pausing the
    reactor) also wakes the reactor so that it pauses at once."""

    def __init__(self, reactor_cond: threading.Condition) -> None:
        super().__init__()
        # (not ``_cond``: that is the Event's own condition)
        self._dc_reactor_cond = reactor_cond
        #: Orders clear() against the reactor's "still running?" re-check.
        self.dc_lock = threading.Lock()

    def clear(self) -> None:
        with self.dc_lock:
            super().clear()
        with self._dc_reactor_cond:
            self._dc_reactor_cond.notify_all()


def _reactor_wait(self: Any) -> None:
    if not isinstance(self._reactor_checkpoint, _Checkpoint):  # made before install()
        time.sleep(0.001)
        return
    q = self.dimse.msg_queue
    cond = q.not_empty
    checkpoint = self._reactor_checkpoint
    with cond:  # the queue's own mutex: use its unlocked _qsize() inside
        if q._qsize() or self._kill or not checkpoint.is_set():
            return
        cond.wait(REACTOR_IDLE)
        if q._qsize() and not checkpoint.is_set():
            # We may have taken a put()'s notify meant for a send_*() waiting in
            # get(): hand it on.
            cond.notify()


_orig_assoc_init = Association.__init__


def _assoc_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _orig_assoc_init(self, *args, **kwargs)
    cp = _Checkpoint(self.dimse.msg_queue.not_empty)
    if self._reactor_checkpoint.is_set():
        cp.set()
    self._reactor_checkpoint = cp


def _assoc_run_reactor(self: Any) -> None:
    """pynetdicom 3.0.4's ``Association._run_reactor`` with an event-driven wait."""
    alog = _assoc_logger()
    from pynetdicom import evt

    self._is_paused = False
    while not self._kill:
        _reactor_wait(self)

        self._is_paused = True
        checkpoint = self._reactor_checkpoint
        checkpoint.wait()
        # pynetdicom's own race (the "Received unexpected C-STORE service message"
        # then DIMSE timeout of FACTS.md): woken by set(), we still show
        # _is_paused=True until we run; a send_*() that clears the checkpoint in
        # between sees that stale True, sends, and we would take its response off
        # the queue.  Re-check under the lock clear() takes: cleared again → stay
        # paused, do not touch the queue.
        if isinstance(checkpoint, _Checkpoint):
            with checkpoint.dc_lock:
                if not checkpoint.is_set():
                    continue
                self._is_paused = False
        else:  # an association made before install(): pynetdicom's behaviour
            self._is_paused = False

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, context_id)

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            alog.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            alog.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            alog.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()

            self.kill()
            return


def _assoc_logger() -> logging.Logger:
    from pynetdicom import association

    return association.LOGGER


def _socket_recv(self: Any, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv``: up to ``nr_bytes`` (fewer only if the peer closed)."""
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    sock = self.socket
    while got < nr_bytes:
        n = sock.recv_into(view[got:], nr_bytes - got)
        if not n:
            del view
            return buf[:got]
        got += n
    del view
    return buf


def install() -> bool:
    """Patch pynetdicom (idempotent); False when its version is not one we know."""
    global _installed
    with _install_lock:
        if _installed:
            return True
        if pynetdicom.__version__ not in SUPPORTED:
            log.warning("pynetdicom %s: keeping its polling reactors (event-driven waits "
                        "are written for %s)", pynetdicom.__version__, ", ".join(SUPPORTED))
            return False
        _dul.DULServiceProvider.run_reactor = _dul_run_reactor  # type: ignore[method-assign]
        _dul.DULServiceProvider.send_pdu = _dul_send_pdu  # type: ignore[method-assign]
        _dul.DULServiceProvider.kill_dul = _dul_kill_dul  # type: ignore[method-assign]
        _dul.DULServiceProvider.stop_dul = _dul_stop_dul  # type: ignore[method-assign]
        Association.__init__ = _assoc_init  # type: ignore[method-assign]
        Association._run_reactor = _assoc_run_reactor  # type: ignore[method-assign]
        AssociationSocket.recv = _socket_recv  # type: ignore[method-assign]
        _installed = True
        return True
