"""Importing the relay changes nothing: no pynetdicom patches, no switches, no threads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_every_relay_module_has_no_side_effects() -> None:
    code = textwrap.dedent("""
        import pkgutil, threading
        import pynetdicom
        from pynetdicom import _config, association, dimse, dul, fsm, transport
        from pynetdicom.dimse_messages import DIMSEMessage

        def state():
            owners = (dul.DULServiceProvider, association.Association, transport.AssociationSocket,
                      dimse.DIMSEServiceProvider, DIMSEMessage, transport, association)
            return ([dict(vars(o)) for o in owners], dict(fsm.ACTIONS),
                    {k: v for k, v in vars(_config).items() if k.isupper()})

        before, threads = state(), threading.active_count()
        import dicomcache.relay, dicomcache.cli.relay
        for mod in pkgutil.walk_packages(dicomcache.relay.__path__, "dicomcache.relay."):
            __import__(mod.name)
        assert state() == before, "importing the relay changed pynetdicom"
        assert threading.active_count() == threads
        assert _config.STORE_SEND_CHUNKED_DATASET is False
        from dicomcache.relay import accel
        assert not accel.installed()
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
