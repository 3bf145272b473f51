"""dicomcache: a verified edge cache and C-STORE relay in front of a remote Orthanc PACS."""

__version__ = "0.1.0"
