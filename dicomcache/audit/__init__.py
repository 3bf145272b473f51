"""The audit trail: one record per access to patient data, whoever made it.

Used by the HTTP side (every request for patient data, denied ones too), the
prefetcher (downloads a viewer's touch caused, attributed to that viewer), the
relay (C-STOREs received and forwarded) and the CLI (purges, and the
``dicomcache audit`` query).  Above the base layer only: importing it starts
nothing.

* :mod:`.record`: what a record says (pure): who, what, which action, the
  outcome; its JSON line; what a query matches.
* :mod:`.trail`: the file (``flock``-shared by every process, fsynced, rotated
  by size) and :class:`~.trail.AuditLog`, the one writer thread a process has.
* :mod:`.atna` and :mod:`.syslog`: the same records as DICOM audit messages
  (PS3.15 A.5) over RFC 5424 syslog (UDP, TCP, TLS).
* :mod:`.query`: reading the current and rotated files back, streaming.
"""
