"""The switch: ``[relay] accelerate``, install(), uninstall(), installed()."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pynetdicom import AE, association, dimse, dul, fsm, transport
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dimse_messages import DIMSEMessage

from dicomcache.config import from_dict
from dicomcache.errors import ConfigError
from dicomcache.relay import accel

#: What relay/accel/ replaces in pynetdicom (owner, attribute).
PATCHED = [
    (dul.DULServiceProvider, "run_reactor"), (dul.DULServiceProvider, "send_pdu"),
    (dul.DULServiceProvider, "kill_dul"), (dul.DULServiceProvider, "stop_dul"),
    (dul.DULServiceProvider, "_send"), (Association, "__init__"),
    (Association, "_run_reactor"), (Association, "_bind_defaults"),
    (transport.AssociationServer, "_bind_defaults"),
    (transport.AssociationSocket, "recv"), (dimse.DIMSEServiceProvider, "send_msg"),
    (DIMSEMessage, "_set_command_group_length"), (transport, "deepcopy"),
    (association, "split_dataset"),
]


def _pynetdicom_state() -> list[Any]:
    return [*(vars(owner).get(name) for owner, name in PATCHED),
            fsm.ACTIONS["DT-1"], fsm.ACTIONS["AR-7"], pynetdicom_config.LOG_HANDLER_LEVEL]


def test_the_accelerator_is_written_for_this_pynetdicom() -> None:
    assert accel.install() is True
    assert accel.installed()


def test_uninstall_puts_every_original_back() -> None:
    accel.uninstall()
    assert not accel.installed()
    pristine = _pynetdicom_state()
    assert accel.install()
    assert accel.install()  # idempotent
    patched = _pynetdicom_state()
    changed = [i for i, (a, b) in enumerate(zip(pristine, patched, strict=True)) if a is not b]
    assert changed == list(range(len(PATCHED) + 2))  # every function and both DUL actions
    logger = logging.getLogger("pynetdicom")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        Association(AE(), "requestor")  # the accelerated _bind_defaults sets pynetdicom's
    finally:                            # LOG_HANDLER_LEVEL
        logger.setLevel(level)
    assert pynetdicom_config.LOG_HANDLER_LEVEL == "none"
    accel.uninstall()
    accel.uninstall()  # idempotent
    assert not accel.installed()
    assert _pynetdicom_state() == pristine


def test_accelerate_is_a_relay_setting() -> None:
    assert from_dict({}).relay.accelerate is True
    assert from_dict({"relay": {"accelerate": False}}).relay.accelerate is False
    with pytest.raises(ConfigError) as err:
        from_dict({"relay": {"accelerate": "yes"}})
    assert [key for key, _ in err.value.problems] == ["relay.accelerate"]
