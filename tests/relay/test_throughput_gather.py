"""The forwarder's batches while a modality sends (relay/forward.py: gather_delay)."""

from __future__ import annotations

import pytest

from dicomcache.relay.forward import GATHER_MAX, GATHER_QUIET, GATHER_TARGET, gather_delay


@pytest.mark.parametrize(("batch", "batch_size", "since_arrival", "waited", "expected"), [
    # Instances keep arriving and the batch is small: wait for the quiet gap.
    (3, 500, 0.0, 0.0, GATHER_QUIET),
    (3, 500, 0.02, 0.0, GATHER_QUIET - 0.02),
    # The modality paused (or finished): send what there is.
    (3, 500, GATHER_QUIET, 0.0, 0.0),
    (1, 500, 10.0, 0.0, 0.0),
    # Big enough: send at once, however fast instances arrive.
    (GATHER_TARGET, 500, 0.0, 0.0, 0.0),
    (400, 500, 0.0, 0.0, 0.0),
    # A configured batch_size below the target is big enough too.
    (4, 4, 0.0, 0.0, 0.0),
    (3, 4, 0.0, 0.0, GATHER_QUIET),
    # Never longer than GATHER_MAX in all for one batch.
    (3, 500, 0.0, GATHER_MAX - 0.01, 0.01),
    (3, 500, 0.0, GATHER_MAX, 0.0),
    (3, 500, 0.0, GATHER_MAX + 5, 0.0),
])
def test_gather_delay(batch: int, batch_size: int, since_arrival: float, waited: float,
                      expected: float) -> None:
    assert gather_delay(batch, batch_size, since_arrival, waited) == pytest.approx(expected)
