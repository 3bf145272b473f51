"""When to try again: retry delays and the retry limit (pure functions).

A destination that is down, rejects the association or aborts, and a study
whose instance the peer refused with a transient status, wait before the next
attempt: ``retry_backoff_base`` doubling per consecutive failure, up to
``retry_backoff_max``, then *equal jitter* (a random share between half and
all of it) so that the retries of many relays, or of many studies, spread out.
An instance the peer keeps refusing is given up after ``max_instance_retries``
refusals.
"""

from __future__ import annotations


def exponential(failures: int, base: float, cap: float) -> float:
    """The delay after the ``failures``-th consecutive failure (1, 2, …), before jitter:
    ``base``, ``2 * base``, ``4 * base`` … and never more than ``cap``."""
    # 2.0 ** 1024 overflows a float (OverflowError): far past the cap anyway.
    return min(cap, base * 2.0 ** min(failures - 1, 1000))


def jittered(delay: float, draw: float) -> float:
    """Equal jitter: between half and all of ``delay``, for ``draw`` uniform in [0, 1)."""
    return delay * (0.5 + 0.5 * draw)


def retry_delay(failures: int, base: float, cap: float, draw: float) -> float:
    """The wait after the ``failures``-th consecutive failure: :func:`exponential`,
    :func:`jittered` by ``draw`` (``random.random()``)."""
    return jittered(exponential(failures, base, cap), draw)


def refused_too_often(status: int | None, refusals_before: int, max_instance_retries: int
                      ) -> bool:
    """Whether a transient refusal of an instance (a C-STORE answered with ``status``)
    is one too many: the peer has now refused it ``max_instance_retries`` times.

    Only refusals count: no status (peer down, abort, timeout) says nothing
    about the instance.  ``refusals_before``: the failed attempts recorded for
    it so far.
    """
    return status is not None and refusals_before + 1 >= max_instance_retries
