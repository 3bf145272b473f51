"""Speed-ups for pynetdicom, behind one switch (``[relay] accelerate``).

:func:`install` replaces some of pynetdicom's functions process-wide with
faster ones that keep its behaviour and the bytes on the wire (see
:mod:`.fastdul`; :mod:`.codec` holds the encoders they use).  The relay calls
it when it starts (:meth:`dicomcache.relay.service.Relay.start`, and its
forwarder process), never at import; with ``accelerate = false`` pynetdicom
runs as published.  :func:`uninstall` puts pynetdicom's own functions back
(the tests run the relay both ways).
"""

from dicomcache.relay.accel.fastdul import install, installed, uninstall

__all__ = ["install", "installed", "uninstall"]
