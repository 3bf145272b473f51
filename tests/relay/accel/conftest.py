"""The tests of ``relay/accel/`` itself run with it installed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dicomcache.relay import accel


@pytest.fixture(autouse=True)
def installed() -> Iterator[None]:
    assert accel.install(), "relay/accel/ is written for this pynetdicom"
    yield
    accel.uninstall()
