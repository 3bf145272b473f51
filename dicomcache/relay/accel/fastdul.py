"""Faster pynetdicom: event-driven waits, whole-PDU reads and sends, fewer pydicom calls.

pynetdicom 3.0.4 polls: its DUL thread sleeps 1 ms whenever it finds nothing
to do, its association thread sleeps 1 ms per loop, and a PDU is read 4 KiB
per ``recv`` call.  Per C-STORE that costs several sleeps on both sides (the
SCP: PDUs arrive → message complete → handler → response queued → sent; the
SCU: pause the reactor → send → response), which a modality waiting for each
acknowledgement feels directly, and more on a loaded machine where a sleeping
thread is not rescheduled at once.  docs/relay.md ("Performance") has the
measurements behind each replacement.

:func:`install` replaces, process-wide and only for the pynetdicom version
these were written against (:data:`SUPPORTED`; otherwise it changes nothing),
and :func:`uninstall` puts back:

* ``DULServiceProvider.run_reactor``: the same loop, but its idle wait is a
  ``select`` on the socket and on an ``eventfd`` that ``send_pdu``,
  ``kill_dul`` and ``stop_dul`` (replaced too) signal (at most
  :data:`DUL_IDLE`, for the ARTIM timer);
* ``Association._run_reactor`` (and ``__init__``, for its checkpoint event):
  the same loop, but its 1 ms sleep is a wait on the DIMSE message queue (a
  complete message wakes it; so does a ``send_*`` pausing the reactor; at
  most :data:`REACTOR_IDLE`, for release/abort/idle checks), without
  pynetdicom's pause race ("Received unexpected C-STORE service message");
* ``AssociationSocket.recv``: ``recv_into`` one buffer of the PDU's size;
* ``DIMSEServiceProvider.send_msg`` and the state machine's DT-1/AR-7 (send
  P-DATA-TF): a DIMSE message is encoded at once into whole P-DATA-TF PDUs
  (blocks of at most :data:`~.codec.RAW_BLOCK` bytes) that go out with one
  ``sendall``, from the calling thread when nothing is queued ahead (a lock
  per association, taken by ``DULServiceProvider._send`` too, orders it with
  the DUL thread), else through the DUL queue as one primitive per block.
  pynetdicom queues one primitive per PDU, each a thread hand-off, an event,
  a PDU object, an ``encode`` and a ``send``.  The bytes on the wire are the
  same (same fragments, same message control headers, same maximum PDU
  length); only ``EVT_PDU_SENT``/``EVT_DATA_SENT`` are not fired for these
  PDUs (nothing here binds them).  A peer that takes nothing for the network
  timeout closes the transport;
* ``DIMSEMessage._set_command_group_length`` and the command set of every
  message sent: encoded by :func:`~.codec.encode_command` (Implicit VR Little
  Endian, the handful of VRs command sets use; anything else goes to pydicom)
  instead of pydicom's writer, which pynetdicom runs twice per message (once
  for the group length); a C-STORE's command set straight from its primitive
  (:func:`~.codec.store_command`);
* ``DIMSEMessage.decode_msg`` and ``message_to_primitive``: a received
  C-STORE-RQ's or -RSP's command set is read by
  :func:`~.codec.decode_store_command` and its
  primitive made directly (:func:`~.codec.store_primitive`), without pydicom's
  decode and pynetdicom's second check of every UID, when nobody is shown
  the message (no ``EVT_DIMSE_RECV`` handler) and its data set is received in
  memory; any other command set, or one it does not take, is pydicom's;
* ``association.split_dataset`` (what ``send_c_store`` reads from a file):
  :func:`~.codec.read_file_meta` reads the three UIDs it needs directly;
* ``Association._bind_defaults`` and ``AssociationServer._bind_defaults``:
  pynetdicom's "standard" logging handlers (every PDU and DIMSE message
  formatted for its logger; one copies the whole data set to see whether there
  is one) are bound only when the ``pynetdicom`` logger would print INFO, not
  at the WARNING level the relay runs it at.  The server's count: its
  associations inherit them, and a handler of ``EVT_DIMSE_SENT`` sends every
  C-STORE response through pydicom (measured: a quarter of the SCP's CPU per
  C-STORE);
* the ``deepcopy`` of the server's presentation contexts that pynetdicom
  makes for every inbound association: :func:`copy_contexts` gives the same
  independent copies (the contexts' only mutable part is their list of
  transfer syntaxes) without deepcopy's walk of every object, before every
  A-ASSOCIATE-AC.

State machine, PDU handling and the pause protocol are untouched: the waits
change, and how many pieces a message is handed to the DUL in.
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Iterator
from typing import Any

import pynetdicom
from pynetdicom import _config as _pynetdicom_config
from pynetdicom import association as _association
from pynetdicom import dimse as _dimse
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom import dul as _dul
from pynetdicom import evt, fsm
from pynetdicom import transport as _transport
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket

from dicomcache.relay.accel.codec import (
    command_bytes,
    decode_store_command,
    encode_message,
    encode_pdus,
    read_file_meta,
    store_command,
    store_primitive,
)

log = logging.getLogger(__name__)

#: The pynetdicom versions whose reactor loops these replacements mirror.
SUPPORTED = ("3.0.4",)
#: Longest idle wait of the DUL thread (it checks the ARTIM timer between waits).
DUL_IDLE = 0.05
#: The largest read a peer's PDU header may ask for (set by :func:`install` from
#: ``[relay] max_pdu``): a 6-byte header announcing 1 GiB must never allocate it.
#: Association PDUs are small; P-DATA ones are bounded by what we advertised.
pdu_read_limit = 131072 + 6
#: With ``max_pdu = 0`` (no limit advertised), still this much at most.
UNLIMITED_PDU_READ = 64 << 20
#: Memory set aside for a read before its bytes arrive (it grows as they do).
_FIRST_ALLOCATION = 1 << 20


def read_limit(max_pdu: int) -> int:
    """What a peer may make one PDU read ask for (pure): our advertised maximum (at least
    64 KiB, for association PDUs) plus the 6-byte header; a cap when we advertise none."""
    return UNLIMITED_PDU_READ if max_pdu <= 0 else max(max_pdu, 1 << 16) + 6
#: Longest idle wait of the association thread (release/abort/idle-timeout checks).
REACTOR_IDLE = 0.01

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
    """``AssociationSocket.recv``: up to ``nr_bytes`` (fewer only if the peer closed).

    A read larger than :data:`pdu_read_limit` (a PDU header announcing more than we
    accept) is an ``OSError`` before anything is allocated: pynetdicom then closes the
    connection (Evt17).  Memory grows with the bytes that arrive, not with the
    length announced.
    """
    if nr_bytes > pdu_read_limit:
        raise OSError(f"the peer announced a PDU of {nr_bytes - 6} bytes, more than the "
                      f"{pdu_read_limit - 6} accepted ([relay] max_pdu): connection closed")
    buf = bytearray(min(nr_bytes, _FIRST_ALLOCATION))
    got = 0
    sock = self.socket
    while got < nr_bytes:
        if got == len(buf):  # the peer keeps sending: make room for the next part
            buf.extend(bytes(min(nr_bytes - got, len(buf))))
        with memoryview(buf) as view:
            n = sock.recv_into(view[got:], len(buf) - got)
        if not n:
            return buf[:got]
        got += n
    return buf


# --- DIMSE messages as whole encoded PDUs ----------------------------------------------
def _set_command_group_length(self: Any) -> None:
    """pynetdicom's ``_set_command_group_length`` with :func:`~.codec.encode_command`."""
    del self.command_set.CommandGroupLength
    self.command_set.CommandGroupLength = len(command_bytes(self.command_set))


_orig_decode_msg = DIMSEMessage.decode_msg
_orig_message_to_primitive = DIMSEMessage.message_to_primitive
#: CommandDataSetType "no data set" (PS3.7 E.1-1).
_NO_DATA_SET = 0x0101


def _decode_msg(self: Any, primitive: Any, assoc: Any = None) -> bool:
    """pynetdicom 3.0.4's ``DIMSEMessage.decode_msg``, a C-STORE's command set read by
    :func:`~.codec.decode_store_command` (kept for :func:`_message_to_primitive`).

    pynetdicom's own when a handler of ``EVT_DIMSE_RECV`` is to be shown the message
    (its command set as a Dataset) or data sets are received into files."""
    if (primitive.__class__ is not P_DATA or assoc is None
            or _pynetdicom_config.STORE_RECV_CHUNKED_DATASET
            or assoc.get_handlers(evt.EVT_DIMSE_RECV)):
        return bool(_orig_decode_msg(self, primitive, assoc))
    for context_id, data in primitive.presentation_data_value_list:
        header = data[0]
        if header & 1:  # command set fragment
            self.encoded_command_set.write(data[1:])
            if not header & 2:
                continue
            self.context_id = context_id
            command = decode_store_command(self.encoded_command_set.getvalue())
            if command is not None:
                self._dc_store_command = command
                if not command.request:
                    self.__class__ = C_STORE_RSP
                    return True
                self.__class__ = C_STORE_RQ
                continue
            self.command_set = decode(self.encoded_command_set, True, True)
            self.__class__ = _dimse_messages._MESSAGE_TYPES[self.command_set.CommandField][1]
            if self.command_set.CommandDataSetType == _NO_DATA_SET:
                return True
        else:  # data set fragment (a view: no copy of up to max_pdu bytes)
            self.data_set.write(memoryview(data)[1:])
            if header & 2:
                return True
    return False


def _message_to_primitive(self: Any) -> Any:
    """pynetdicom's ``message_to_primitive``; a C-STORE that :func:`_decode_msg` read
    becomes its primitive directly (:func:`~.codec.store_primitive`)."""
    command = self.__dict__.get("_dc_store_command")
    if command is None:
        return _orig_message_to_primitive(self)
    primitive = store_primitive(command)
    if command.request:
        primitive.DataSet = self.data_set
    primitive._context_id = self.context_id
    primitive._dataset_path = self._data_set_path
    primitive._dataset_file = self._data_set_file
    return primitive


class RawPData(P_DATA):
    """A P-DATA request whose PDUs are already encoded (a block of one DIMSE message)."""

    def __init__(self, raw: bytearray) -> None:
        super().__init__()
        self.dc_raw = raw


def _dimse_send_msg(self: Any, primitive: Any, context_id: int) -> None:
    """pynetdicom 3.0.4's ``DIMSEServiceProvider.send_msg``, whole PDUs per block, sent
    from this thread when the association is established and nothing is queued."""
    dul = self.dul
    for block in _message_blocks(self, primitive, context_id):
        sent = _send_now(dul, block)
        if sent is None:
            dul.send_pdu(RawPData(block))
        elif not sent:  # the transport is closed: the rest could not go either
            return


def _message_blocks(self: Any, primitive: Any, context_id: int) -> Iterator[bytearray]:
    fast = None if self.assoc.get_handlers(evt.EVT_DIMSE_SENT) else store_command(primitive)
    if fast is not None:  # nobody to show a DIMSE message object to
        return encode_pdus(*fast, context_id, self.maximum_pdu_size)
    if primitive.MessageIDBeingRespondedTo is None:
        msg = _dimse._RQ_TO_MESSAGE[primitive.__class__]()
    else:
        msg = _dimse._RSP_TO_MESSAGE[primitive.__class__]()
    msg.primitive_to_message(primitive)
    msg.context_id = context_id
    evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": msg})
    return encode_message(msg, context_id, self.maximum_pdu_size)


def _send_lock(dul: Any) -> threading.RLock:
    """Serialises every write to the association's socket (this thread's and the DUL's)."""
    lock = dul.__dict__.get("_dc_send_lock")
    if lock is None:
        with _install_lock:
            lock = dul.__dict__.get("_dc_send_lock")
            if lock is None:
                lock = dul._dc_send_lock = threading.RLock()
    return lock  # type: ignore[no-any-return]


def _send_now(dul: Any, raw: bytearray) -> bool | None:
    """Send P-DATA-TF PDUs from the calling thread: True if sent, False if the transport
    failed (closed, or the peer took nothing for the timeout), None if they must be
    queued for the DUL thread instead.

    Only in Sta6 (established) with nothing queued ahead: the DUL thread takes a
    primitive off its queue and sends it under the same lock, so nothing it
    still has to send can be overtaken.  This spares a hand-off to the DUL
    thread and back per message (the SCP's acknowledgement, the SCU's request).
    """
    with _send_lock(dul):
        sock = dul.socket
        if (dul.state_machine.current_state != "Sta6" or dul.to_provider_queue.qsize()
                or sock is None or getattr(sock, "socket", None) is None):
            return None
        if not _sendall(dul, sock, raw):
            _waker(dul).wake()  # the DUL thread handles the closed transport now
            return False
        return True


def _send_pdata(dul: Any) -> None:
    """DT-1/AR-7: send the queued P-DATA request (pre-encoded or not)."""
    with _send_lock(dul):
        primitive = dul.to_provider_queue.get(False)
        raw = getattr(primitive, "dc_raw", None)
        if raw is None:
            dul._send(P_DATA_TF(primitive))
            return
        sock = dul.socket
        if sock is None:
            _dul.LOGGER.warning("Attempted to send data over closed connection")
            return
        _sendall(dul, sock, raw)


def _sendall(dul: Any, sock: Any, raw: bytearray) -> bool:
    """Send it all; a peer that takes nothing for the network timeout closes the transport.

    pynetdicom leaves a requestor's socket without a timeout once connected: a
    PACS that stops reading would hold the sending thread for ever (and, with it,
    the DIMSE timeout that would abort the association).
    """
    raw_sock = sock.socket
    try:
        if raw_sock.gettimeout() is None:
            timeout = dul.assoc.network_timeout or dul.assoc.dimse_timeout
            if timeout:
                raw_sock.settimeout(timeout)
        raw_sock.sendall(raw)
    except Exception:
        sock.event_queue.put("Evt17")
        return False
    return True


_orig_dul_send = _dul.DULServiceProvider._send


def _dul_send(self: Any, pdu: Any) -> None:
    """``DULServiceProvider._send`` under the socket's send lock."""
    with _send_lock(self):
        _orig_dul_send(self, pdu)


def _dt_1(dul: Any) -> str:
    _send_pdata(dul)
    return "Sta6"


def _ar_7(dul: Any) -> str:
    _send_pdata(dul)
    return "Sta8"


def copy_contexts(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """``copy.deepcopy`` for pynetdicom's transport module: a list of presentation
    contexts is copied context by context (their attributes are immutable but
    the transfer syntax list); anything else goes to ``copy.deepcopy``."""
    if not isinstance(obj, list) or not all(type(c) is PresentationContext for c in obj):
        return copy.deepcopy(obj, memo)
    out = []
    for cx in obj:
        new = copy.copy(cx)
        for name, value in vars(cx).items():
            if isinstance(value, list):
                setattr(new, name, list(value))
        out.append(new)
    return out


_orig_split_dataset = _association.split_dataset  # type: ignore[attr-defined]


def _split_dataset(path: Any) -> tuple[Any, int]:
    """``split_dataset`` for ``send_c_store``: :func:`~.codec.read_file_meta`,
    else pydicom's reading."""
    found = read_file_meta(path)
    return found if found is not None else _orig_split_dataset(path)


_orig_bind_defaults = Association._bind_defaults


def _quiet_unless_verbose() -> None:
    """pynetdicom's LOG_HANDLER_LEVEL (its public option): its logging handlers only when
    its logger would print what they format."""
    verbose = logging.getLogger("pynetdicom").isEnabledFor(logging.INFO)
    _pynetdicom_config.LOG_HANDLER_LEVEL = "standard" if verbose else "none"


def _bind_defaults(self: Any) -> None:
    """pynetdicom's default handlers; its logging ones only if they would print."""
    _quiet_unless_verbose()
    _orig_bind_defaults(self)


_orig_server_bind_defaults = _transport.AssociationServer._bind_defaults


def _server_bind_defaults(self: Any) -> None:
    """The same for a server (what its associations inherit)."""
    _quiet_unless_verbose()
    _orig_server_bind_defaults(self)


#: Stands for "no attribute of that name" among the saved originals.
_ABSENT = object()
#: What :func:`install` replaced, to put back: (owner, name, original), the DT-1/AR-7
#: actions, pynetdicom's LOG_HANDLER_LEVEL.  None while not installed.
_saved: tuple[list[tuple[Any, str, Any]], dict[str, Any], str] | None = None


def _patches() -> list[tuple[Any, str, Any]]:
    """Every (owner, attribute, replacement) :func:`install` sets."""
    return [
        (_dul.DULServiceProvider, "run_reactor", _dul_run_reactor),
        (_dul.DULServiceProvider, "send_pdu", _dul_send_pdu),
        (_dul.DULServiceProvider, "kill_dul", _dul_kill_dul),
        (_dul.DULServiceProvider, "stop_dul", _dul_stop_dul),
        (_dul.DULServiceProvider, "_send", _dul_send),
        (Association, "__init__", _assoc_init),
        (Association, "_run_reactor", _assoc_run_reactor),
        (Association, "_bind_defaults", _bind_defaults),
        (_transport.AssociationServer, "_bind_defaults", _server_bind_defaults),
        (AssociationSocket, "recv", _socket_recv),
        (_dimse.DIMSEServiceProvider, "send_msg", _dimse_send_msg),
        (DIMSEMessage, "_set_command_group_length", _set_command_group_length),
        (DIMSEMessage, "decode_msg", _decode_msg),
        (DIMSEMessage, "message_to_primitive", _message_to_primitive),
        (_transport, "deepcopy", copy_contexts),
        (_association, "split_dataset", _split_dataset),
    ]


def install(max_pdu: int = 131072) -> bool:
    """Patch pynetdicom, process-wide (idempotent); False when its version is not one
    these replacements were written for (then nothing is changed).  ``max_pdu``: the
    largest PDU we advertise (``[relay] max_pdu``), which bounds every read."""
    global _saved, pdu_read_limit
    with _install_lock:
        pdu_read_limit = read_limit(max_pdu)
        if _saved is not None:
            return True
        if pynetdicom.__version__ not in SUPPORTED:
            log.warning("pynetdicom %s: keeping its polling reactors (event-driven waits "
                        "are written for %s)", pynetdicom.__version__, ", ".join(SUPPORTED))
            return False
        patches = _patches()
        originals = [(owner, name, vars(owner).get(name, _ABSENT))
                     for owner, name, _ in patches]
        actions = {name: fsm.ACTIONS[name] for name in ("DT-1", "AR-7")}
        _saved = (originals, actions, _pynetdicom_config.LOG_HANDLER_LEVEL)
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        for name, action in (("DT-1", _dt_1), ("AR-7", _ar_7)):
            description, _, state = actions[name]
            fsm.ACTIONS[name] = (description, action, state)
        return True


def uninstall() -> None:
    """Put pynetdicom's own functions back (idempotent).

    Only while no association runs (tests switch between both ways with it):
    an association started with the replacements may have queued pre-encoded
    PDUs that pynetdicom's own DT-1 cannot send.
    """
    global _saved
    with _install_lock:
        if _saved is None:
            return
        originals, actions, log_level = _saved
        for owner, name, original in reversed(originals):
            if original is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        fsm.ACTIONS.update(actions)
        _pynetdicom_config.LOG_HANDLER_LEVEL = log_level
        _saved = None


def installed() -> bool:
    """Whether :func:`install` has patched pynetdicom (and :func:`uninstall` has not undone it)."""
    return _saved is not None
