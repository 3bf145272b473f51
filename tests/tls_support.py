"""A test CA (trustme) and the PEM files the TLS tests configure: helpers, no fixtures
with side effects beyond ``tmp_path``."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Pair:
    """A certificate (chain) file and its key file."""

    cert: Path
    key: Path


def write_pair(ca: trustme.CA, directory: Path, name: str, *identities: str,
               not_before: dt.datetime | None = None,
               not_after: dt.datetime | None = None) -> Pair:
    """A certificate for ``identities`` (default: localhost and 127.0.0.1) signed by
    ``ca``, written as ``name.crt`` (with its chain) and ``name.key``."""
    leaf = ca.issue_cert(*(identities or ("localhost", "127.0.0.1")),
                         not_before=not_before, not_after=not_after)
    directory.mkdir(parents=True, exist_ok=True)
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    pair.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(pair.key))
    return pair


def write_ca(ca: trustme.CA, path: Path) -> Path:
    ca.cert_pem.write_to_path(str(path))
    return path
