"""How long a viewer keeps seeing what the hospital deleted or corrected in the PACS.

One real Orthanc (``OverwriteInstances`` on, as a PACS taking corrections), the WAN
emulator in front of it (``--rtt-ms``, default 40 ms), and ``dicomcache serve`` as a
subprocess with its **default** coherence settings (change feed polled every second,
series in use confirmed every second).  For each change a hospital makes, a study is
uploaded, viewed through every API family (REST ``/file``, WADO-URI, WADO-RS
instance, frames, series retrieve), changed in Orthanc, and then asked every 50 ms
until every family answers what Orthanc itself answers.  Printed: seconds from the
change to the first consistent answer (median and worst of ``--rounds``), against
the goal of 2 s; the baseline is Orthanc direct, consistent at once by definition.

Also: requests dicomcache sends Orthanc per second to keep one viewed series
confirmed (the cost of coherence on the link).

    ./run bench bench/coherence.py [--rounds 3] [--rtt-ms 40]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import http.client
import json
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from _daemon import Daemon, serve_settings  # noqa: E402
from dicomcache.devtools.orthanc import OrthancProcess  # noqa: E402
from dicomcache.devtools.samples import encode, make_ct_series  # noqa: E402
from dicomcache.devtools.wanem import LinkProfile, ThreadedWanEmulator  # noqa: E402

ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
GOAL = 2.0
BOUND = 30.0


def get(base: str, path: str, headers: dict[str, str], auth: str | None = None
        ) -> tuple[int, str, bytes]:
    req = urllib.request.Request(base + path, headers=headers)
    if auth:
        req.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()
    except http.client.IncompleteRead:  # a cut answer: never what Orthanc answers
        print(f"    cut answer: {path}", file=sys.stderr)
        return -1, "", b""


def digest(status: int, ctype: str, body: bytes) -> object:
    """What must agree: the status; for a 200 the bytes (each part's for multipart)."""
    if status != 200:
        return status
    if ctype.startswith("multipart/"):
        boundary = ctype.split("boundary=", 1)[1].strip('"').encode()
        parts = body.split(b"--" + boundary)[1:-1]
        return [hashlib.md5(p.split(b"\r\n\r\n", 1)[1][:-2]).hexdigest() for p in parts]
    return hashlib.md5(body).hexdigest()


def paths(ds: Dataset, oid: str) -> list[tuple[str, dict[str, str]]]:
    st, se, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    rs = f"/dicom-web/studies/{st}/series/{se}"
    return [(f"/instances/{oid}/file", {}),
            (f"/wado?requestType=WADO&studyUID={st}&seriesUID={se}&objectUID={sop}"
             "&contentType=application/dicom", {}),
            (f"{rs}/instances/{sop}", {"Accept": ANY}),
            (f"{rs}/instances/{sop}/frames/1", {}),
            (rs, {"Accept": ANY})]


class Scenario:
    def __init__(self, orthanc: OrthancProcess, seed: int) -> None:
        self.orthanc = orthanc
        self.datasets = make_ct_series(3, rows=64, columns=64, seed=seed,
                                       patient_id=f"PBENCH{seed}", study_uid=generate_uid(),
                                       series_uid=generate_uid())
        self.oids = orthanc.upload([encode(d, d.file_meta.TransferSyntaxUID)
                                    for d in self.datasets])
        self.study = orthanc.json("GET", f"/instances/{self.oids[0]}/study")["ID"]

    def all_paths(self) -> list[tuple[str, dict[str, str]]]:
        return [p for d, o in zip(self.datasets, self.oids, strict=True) for p in paths(d, o)]

    def modify(self, body: dict[str, object]) -> None:
        self.orthanc.json("POST", f"/studies/{self.study}/modify", json.dumps(body).encode())


def delete_instance(s: Scenario) -> None:
    s.orthanc.request("DELETE", f"/instances/{s.oids[1]}")


def delete_study(s: Scenario) -> None:
    s.orthanc.request("DELETE", f"/studies/{s.study}")


def modify_new_uids(s: Scenario) -> None:
    s.modify({"Replace": {"PatientName": "MOVED^AWAY"}, "KeepSource": False})


def replace_same_uid(s: Scenario) -> None:
    rescan = copy.deepcopy(s.datasets[1])
    rescan.ImageComments = "RE-SCANNED"
    s.orthanc.request("DELETE", f"/instances/{s.oids[1]}")
    s.orthanc.upload([encode(rescan, rescan.file_meta.TransferSyntaxUID)])


def correct_in_place(s: Scenario) -> None:
    s.modify({"Replace": {"PatientName": "CORRECTED^NAME"}, "Force": True,
              "Keep": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]})


ROWS: list[tuple[str, Callable[[Scenario], None]]] = [
    ("delete one instance", delete_instance),
    ("delete a whole study", delete_study),
    ("modify a study with new UIDs (KeepSource false)", modify_new_uids),
    ("delete an instance, send other content with its SOP UID", replace_same_uid),
    ("correct in place (Force, OverwriteInstances)", correct_in_place),
]


def converge(base: str, orthanc: OrthancProcess, todo: list[tuple[str, dict[str, str]]]
             ) -> float:
    start = time.monotonic()
    want = {p: digest(*get(orthanc.url, p, h, orthanc.auth_header)) for p, h in todo}
    while True:
        todo = [(p, h) for p, h in todo if digest(*get(base, p, h)) != want[p]]
        elapsed = time.monotonic() - start
        if not todo or elapsed > BOUND:
            return elapsed if not todo else float("inf")
        time.sleep(0.05)


@contextlib.contextmanager
def dicomcache(workdir: Path, orthanc: OrthancProcess, wan_port: int) -> Iterator[str]:
    """``dicomcache serve`` with default coherence settings; yields its base URL."""
    settings = serve_settings(workdir, f"http://127.0.0.1:{wan_port}", orthanc,
                              max_size="2GiB", prefetch={"mode": "off"})
    with Daemon(workdir, settings) as daemon:
        yield daemon.base


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rtt-ms", type=float, default=40.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with OrthancProcess(work / "orthanc", overrides={"OverwriteInstances": True}) as orthanc, \
                ThreadedWanEmulator("127.0.0.1", orthanc.http_port,
                                    LinkProfile(latency_ms=args.rtt_ms / 2)) as wan, \
                dicomcache(work, orthanc, wan.port) as base:
            print(f"{args.rounds} round(s), RTT {args.rtt_ms:.0f} ms, default coherence "
                  "settings; seconds until every family answers as Orthanc (goal "
                  f"<= {GOAL:.0f} s; Orthanc direct: 0 by definition)")
            # The link cost of keeping one series in use confirmed.
            s = Scenario(orthanc, 99)
            path, headers = paths(s.datasets[0], s.oids[0])[0]
            get(base, path, headers)
            before = sum(wan.stats().requests.values())
            seconds = 10.0
            end = time.monotonic() + seconds
            while time.monotonic() < end:  # a viewer scrolling: one hit every 100 ms
                get(base, path, headers)
                time.sleep(0.1)
            rate = (sum(wan.stats().requests.values()) - before) / seconds
            print(f"  requests to Orthanc while one series is viewed: {rate:.1f}/s "
                  "(series confirmation and change-feed polls)")
            seed = 100
            worst_all = 0.0
            for label, change in ROWS:
                times = []
                for _ in range(args.rounds):
                    seed += 1
                    s = Scenario(orthanc, seed)
                    todo = s.all_paths()
                    for p, h in todo:  # viewed: everything cached
                        get(base, p, h)
                        get(base, p, h)
                    change(s)
                    times.append(converge(base, orthanc, todo))
                worst_all = max(worst_all, max(times))
                print(f"  {label:58s} median {statistics.median(times):5.2f} s  "
                      f"worst {max(times):5.2f} s")
            print(f"worst convergence {worst_all:.2f} s (goal <= {GOAL:.0f} s): "
                  f"{'met' if worst_all <= GOAL else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
