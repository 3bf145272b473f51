"""Who is asking: the principal a request (or a relay association) acts for.

Set by the HTTP authentication middleware on every request (``request[PRINCIPAL]``,
:mod:`dicomcache.http.keys`); read by authorization, the audit trail and the
prefetcher's per-principal bound.  Nothing here may hold a password; a bearer token
is kept only to be passed to the authorization service, and never printed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Roles, from least to most: a viewer reads patient data; an admin also sees the
#: status page, the metrics and the admin actions.
VIEWER = "viewer"
ADMIN = "admin"
ROLES = (VIEWER, ADMIN)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated (or, with ``auth.mode = "none"``, anonymous) client."""

    #: A user name, a token's subject, or ``"anonymous"``.
    name: str
    #: :data:`VIEWER` or :data:`ADMIN`.
    role: str
    #: How it was authenticated: ``"none"``, ``"basic"``, ``"bearer"`` (or ``"dimse"``
    #: for a relay association: the calling AE title).
    method: str
    #: The bearer token as received, for the authorization service only.
    token: str | None = field(default=None, repr=False, compare=False)

    def may(self, role: str) -> bool:
        """Whether this principal holds ``role`` (an admin may do what a viewer may)."""
        return ROLES.index(self.role) >= ROLES.index(role)


#: Who asks while authentication is off (``auth.mode = "none"``, loopback only).
ANONYMOUS = Principal("anonymous", ADMIN, "none")
