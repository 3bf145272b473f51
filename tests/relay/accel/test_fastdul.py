"""fastdul's patches of pynetdicom: where messages are sent from, the pause race, logging
handlers, contexts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dicomcache.devtools.samples import make_ct_series, write_series
from dicomcache.relay.accel import fastdul
from dicomcache.relay.outcome import DELIVERED
from dicomcache.relay.scu import SendItem, StoreSCU
from tests.relay.conftest import CountingSCP

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def test_messages_go_out_from_the_calling_thread_and_arrive_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Established association, nothing queued: C-STORE requests and responses are sent by
    the thread that makes them (no hand-off to the DUL thread), bytes unchanged."""
    import threading

    from pynetdicom import AE, evt
    from pynetdicom import dul as _dul
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from dicomcache.devtools.orthanc import free_port
    from dicomcache.devtools.samples import make_ct_series, write_series

    assert fastdul.install()
    queued: list[int] = []
    original = _dul.DULServiceProvider.send_pdu

    def counting(self: object, primitive: object) -> None:
        if isinstance(primitive, fastdul.RawPData):
            queued.append(len(primitive.dc_raw))
        original(self, primitive)  # type: ignore[arg-type]

    monkeypatch.setattr(_dul.DULServiceProvider, "send_pdu", counting)
    received: dict[str, bytes] = {}
    lock = threading.Lock()

    def store(event: evt.Event) -> int:
        with lock:
            received[str(event.request.AffectedSOPInstanceUID)] = (
                event.request.DataSet.getvalue())  # type: ignore[union-attr]
        return 0

    scp_ae = AE(ae_title="SCP")
    scp_ae.add_supported_context(CTImageStorage, "1.2.840.10008.1.2.1")
    port = free_port()
    server = scp_ae.start_server(("127.0.0.1", port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, store)])
    try:
        series = make_ct_series(5, rows=128, columns=128, seed=9)
        files = write_series(series, tmp_path / "src")
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="SCP", max_pdu=16384)
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(f).Status) for f in files]
        assoc.release()
    finally:
        server.shutdown()
    assert statuses == [0] * 5
    assert queued == []  # every request and response went out directly
    for f, ds in zip(files, series, strict=True):
        raw = f.read_bytes()
        # The data set as in the file after its meta group, byte for byte.
        assert raw.endswith(received[str(ds.SOPInstanceUID)])
        assert len(received[str(ds.SOPInstanceUID)]) > 128 * 128 * 2


def test_pynetdicom_logging_handlers_only_when_they_would_print() -> None:
    import logging

    from pynetdicom import AE, evt
    from pynetdicom.association import Association

    assert fastdul.install()
    logger = logging.getLogger("pynetdicom")
    old = logger.level
    try:
        logger.setLevel(logging.WARNING)
        quiet = Association(AE(), "requestor")
        logger.setLevel(logging.INFO)
        verbose = Association(AE(), "requestor")
    finally:
        logger.setLevel(old)
    assert evt.EVT_DIMSE_RECV not in quiet._handlers
    assert evt.EVT_DIMSE_RECV in verbose._handlers


def test_copied_contexts_are_equal_and_independent() -> None:
    import copy

    from pynetdicom import AE, AllStoragePresentationContexts

    from dicomcache.relay import negotiation as neg

    ae = AE()
    for cx in AllStoragePresentationContexts[:20]:
        ae.add_supported_context(cx.abstract_syntax, list(neg.ACCEPTED_FROM_MODALITIES),
                                 scu_role=True, scp_role=True)
    original = ae.supported_contexts
    ours = fastdul.copy_contexts(original)
    reference = copy.deepcopy(original)
    assert [vars(c) for c in ours] == [vars(c) for c in reference]
    assert all(a is not b for a, b in zip(ours, original, strict=True))
    ours[0].transfer_syntax.append("1.2.3.4")
    ours[0].context_id = 99
    assert "1.2.3.4" not in original[0].transfer_syntax and original[0].context_id is None
    assert fastdul.copy_contexts({"a": [1]}) == {"a": [1]}  # anything else: deepcopy


def test_many_c_stores_in_one_association_keep_request_response_pairing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The SCU pauses its association reactor around each C-STORE; with event-driven
    waits a reactor that missed the pause would take the response ("Received unexpected
    C-STORE service message") and the send would wait for the DIMSE timeout."""
    caplog.set_level(logging.WARNING)
    series = make_ct_series(300, rows=8, columns=8, seed=5)
    files = write_series(series, tmp_path / "src")
    scp = CountingSCP()
    try:
        scu = StoreSCU("RELAY", scp.destination(), timeout=5.0)
        items = [SendItem(i, f, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                          str(ds.file_meta.TransferSyntaxUID))
                 for i, (f, ds) in enumerate(zip(files, series, strict=True))]
        report = scu.send(items)
    finally:
        scp.stop()
    assert [r.outcome for r in report.results] == [DELIVERED] * 300
    assert report.associations == 1
    assert scp.stored == [str(ds.SOPInstanceUID) for ds in series]
    assert "unexpected" not in caplog.text.lower()


def test_a_server_binds_no_logging_handlers_when_they_would_not_print() -> None:
    """The SCP's associations inherit the handlers of pynetdicom's server: bound there,
    pynetdicom's "standard" ones format every message received and send every C-STORE
    response through pydicom (a handler of ``EVT_DIMSE_SENT`` needs a message object)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from dicomcache.devtools.orthanc import free_port

    logger = logging.getLogger("pynetdicom")
    old = logger.level
    servers = []
    try:
        for level in (logging.WARNING, logging.INFO):
            logger.setLevel(level)
            ae = AE()
            ae.add_supported_context(Verification)
            servers.append(ae.start_server(("127.0.0.1", free_port()), block=False))
    finally:
        logger.setLevel(old)
        for server in servers:
            server.shutdown()
    quiet, verbose = servers
    for event in (evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT, evt.EVT_PDU_RECV, evt.EVT_PDU_SENT):
        assert quiet.get_handlers(event) == []
        assert verbose.get_handlers(event) != []
