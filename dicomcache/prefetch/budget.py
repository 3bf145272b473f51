"""How many studies one principal may make the clinic prefetch (pure; time injected).

Prefetch downloads whole studies over the WAN on a viewer's first touch.  Without a
bound, one account (or a stolen one) touching study after study could make the
clinic download a patient's whole history, or the whole PACS.  Each principal may
start prefetching at most ``limit`` distinct studies within ``window`` seconds;
touches past that are still served, just not fetched ahead.  Table-tested in
``tests/prefetch/test_budget.py``.
"""

from __future__ import annotations

from collections import OrderedDict

#: Principals remembered at most (the least recently active are forgotten first).
MAX_PRINCIPALS = 4096


class PrincipalBudget:
    """At most ``limit`` distinct studies per principal per ``window`` seconds."""

    def __init__(self, limit: int, window: float, capacity: int = MAX_PRINCIPALS) -> None:
        self.limit = limit
        self.window = window
        self.capacity = capacity
        self._seen: OrderedDict[str, OrderedDict[str, float]] = OrderedDict()

    def allow(self, who: str, study: str, now: float) -> bool:
        """Whether ``who`` touching ``study`` at ``now`` may prefetch it (and count it)."""
        studies = self._seen.pop(who, None)
        if studies is None:
            studies = OrderedDict()
        self._seen[who] = studies  # most recently active last
        horizon = now - self.window
        while studies and next(iter(studies.values())) <= horizon:
            studies.popitem(last=False)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        if study in studies:
            return True  # already counted in this window: steering it costs nothing
        if len(studies) >= self.limit:
            return False
        studies[study] = now
        return True

    def __len__(self) -> int:
        """Principals remembered (bounded by ``capacity``)."""
        return len(self._seen)
