"""The embedded default: a local demo Orthanc with a generated CT study.

``dicomcache serve`` with no ``upstream.url`` starts one (a plain child
process on 127.0.0.1, never a system service), loads a sample study into it
the first time, and points the proxy at it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
from pathlib import Path

from dicomcache.config import Settings
from dicomcache.devtools.orthanc import OrthancProcess

log = logging.getLogger(__name__)

DEMO_SLICES = 40


def start_demo_orthanc(settings: Settings, state_dir: Path) -> tuple[OrthancProcess, Settings]:
    """Start the demo Orthanc (loading the sample study once) and aim the settings at it."""
    from dicomcache.devtools.samples import (  # numpy-heavy: only when the demo runs
        encode,
        make_ct_series,
    )

    workdir = state_dir / "demo-orthanc"
    workdir.mkdir(parents=True, exist_ok=True)
    secret = workdir / "password"
    if not secret.exists():
        secret.write_text(secrets.token_urlsafe(16))
        secret.chmod(0o600)
    orthanc = OrthancProcess(workdir, username="dicomcache", password=secret.read_text().strip())
    orthanc.start()
    if not orthanc.json("GET", "/instances"):
        log.info("demo: loading a generated %d-slice CT study into the demo Orthanc", DEMO_SLICES)
        datasets = make_ct_series(DEMO_SLICES, patient_id="DEMO0001", patient_name="DEMO^CT")
        orthanc.upload(encode(ds, ds.file_meta.TransferSyntaxUID) for ds in datasets)
    upstream = dataclasses.replace(settings.upstream, url=orthanc.url,
                                   username=orthanc.username, password=orthanc.password)
    return orthanc, dataclasses.replace(settings, upstream=upstream)


def demo_urls(orthanc: OrthancProcess, base: str) -> list[str]:
    """Example URLs (through the proxy) for the demo study."""
    instances = orthanc.json("GET", "/instances")
    if not instances:
        return []
    first = instances[0]
    tags = orthanc.json("GET", f"/instances/{first}/simplified-tags")
    study, series, sop = tags["StudyInstanceUID"], tags["SeriesInstanceUID"], tags["SOPInstanceUID"]
    return [
        f"{base}/dicom-web/studies",
        f"{base}/dicom-web/studies/{study}/series/{series}",
        f"{base}/instances/{first}/file",
        f"{base}/wado?requestType=WADO&studyUID={study}&seriesUID={series}"
        f"&objectUID={sop}&contentType=application/dicom",
        f"{base}/dicom-web/studies/{study}/series/{series}/instances/{sop}",
        f"{base}/metrics",
    ]


def summary(orthanc: OrthancProcess) -> str:
    return json.dumps({"orthanc": orthanc.url, "workdir": str(orthanc.workdir)})
