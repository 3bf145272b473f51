"""OHIF 3.13 opening a study nobody opened before, without a browser: direct vs dicomcache.

One run, one real Orthanc, dicomcache's WAN emulator (``dicomcache wan-emulator``,
here ``ThreadedWanEmulator`` in this process) in front of it, ``dicomcache serve``
as a subprocess with a fresh cache for every cell of the grid.  For each emulated
link (bandwidth x one-way latency) the same study is opened three times:

* **direct**: straight to Orthanc across the link (Orthanc gzips JSON and frames
  for a browser, as it does for OHIF);
* **cold**: through dicomcache, empty cache, prefetch as configured (default
  ``study``, the product's default);
* **warm**: through dicomcache again, right after (searches and metadata may be
  revalidated if they went stale meanwhile, as on a second opening).

The replay is OHIF's open sequence with its URLs and headers, as OHIF 3.13's
DICOMweb data source sends them (``omitQuotationForMultipartRequest: true``), with
a browser's six connections per host (HTTP/1.1) and ``Accept-Encoding: gzip, deflate``:

1. ``GET /studies?StudyInstanceUID={st}&includefield=00081030%2C00080060``
   (``Accept: application/dicom+json``), then ``GET /studies/{st}/series?includefield=…``;
2. ``GET /studies/{st}/series/{se}/metadata`` for every series, the viewed one first
   (``Accept: application/dicom+json``);
3. the viewed series' middle slice, ``GET …/instances/{sop}/frames/1`` with
   ``Accept: multipart/related; type=application/octet-stream; transfer-syntax=*``
   (the first image), and meanwhile each other series' middle slice (its thumbnail);
4. once the first image is there, every other slice of the viewed series, from the
   middle outwards (one below, one above, …), six at a time.

Every frame's pixels are checked against the generated instance.  Reported per
cell, as ratios to direct: the **first image** (from the first search to the middle
slice's pixels), the **series metadata** (that request alone) and the **whole
series** (first search to last slice); and, for dicomcache cold, the bytes that
crossed the link by class: *viewer* (instances the viewer had asked for when their
download started, and frames asked transcoded), *prefetch* (instances fetched ahead;
≈ how much of it crossed before the first image), *JSON* (searches, metadata,
lookups, listings); and the CPU seconds Orthanc spent on the direct opening, and
Orthanc and dicomcache on the cold one with the prefetch after it (until the link
is quiet).  ``--frames-syntax 1.2.840.10008.1.2.4.80`` sets dicomcache's
``upstream.frames_transfer_syntax`` (cold frames asked in JPEG-LS Lossless; their
pixels are decoded and checked like the others).

    ./run bench bench/first_image.py [--quick] [--slices 120] [--runs 1]
        [--links 10x20,10x80,50x20,50x80,200x20,200x80] [--prefetch study|series|off]
        [--compression none|json|all|auto] [--frames-syntax ""|1.2.840.10008.1.2.4.80]
        [--timeline] [--metadata N [--baseline DIR]]

``--metadata N``: instead, the cold series metadata alone, one request at a time: N
series (``--slices`` instances each, 128x128 images: the metadata is the same size),
each asked once straight to Orthanc, through dicomcache (this tree, prefetch off) and,
with ``--baseline DIR``, through a dicomcache from another checkout, in rotating
order, at the first link of ``--links``; medians of the times, of each one's excess
over direct, of dicomcache's own part (its time beyond its request to Orthanc, from
its ``/metrics``: what it adds whatever Orthanc's time) and of its CPU per request
(``/proc``, in 10 ms ticks).

``--quick``: 40 slices, two cells (10 Mbit/s x 20 ms and 200 Mbit/s x 80 ms).  Every
opening has a deadline (``--deadline``, default 600 s); a cell that misses it fails
the run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import hashlib
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from _daemon import Daemon, serve_settings  # noqa: E402
from dicomcache.devtools.orthanc import OrthancProcess  # noqa: E402
from dicomcache.devtools.samples import encode, make_ct_series  # noqa: E402
from dicomcache.devtools.wanem import Exchange, LinkProfile, ThreadedWanEmulator  # noqa: E402
from dicomcache.dicom import multipart  # noqa: E402

JSON = {"Accept": "application/dicom+json"}
#: OHIF's frame Accept with ``omitQuotationForMultipartRequest: true``.
FRAME = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}
#: What OHIF's study and series searches include (commas encoded, as OHIF sends them).
STUDY_FIELDS = "00081030%2C00080060"
SERIES_FIELDS = "0008103E%2C00200011%2C00080060%2C00201209"
#: A browser's connections per host over HTTP/1.1.
BROWSER_CONNECTIONS = 6


@dataclasses.dataclass(frozen=True)
class Series:
    uid: str
    #: SOP Instance UIDs in slice order, and each one's Orthanc ID and pixel MD5.
    sops: list[str]
    oids: dict[str, str]
    pixels: dict[str, str]


@dataclasses.dataclass(frozen=True)
class Study:
    uid: str
    series: list[Series]  # the viewed one first

    @property
    def sop_of(self) -> dict[str, str]:
        return {oid: sop for s in self.series for sop, oid in s.oids.items()}


@dataclasses.dataclass
class Opening:
    """One opening of the study: seconds from its first request, and when each slice
    of the viewed series was asked for (monotonic)."""

    started: float = 0.0
    first_image: float = 0.0
    metadata: float = 0.0
    series: float = 0.0
    asked: dict[str, float] = dataclasses.field(default_factory=dict)


def middle_outwards(n: int) -> list[int]:
    """Slice indexes from the middle outwards: m, m-1, m+1, m-2, m+2, …"""
    m = n // 2
    order = [m]
    for d in range(1, n):
        order += [i for i in (m - d, m + d) if 0 <= i < n]
    return order


async def open_study(base: str, study: Study, auth: str | None) -> Opening:
    """OHIF's open sequence (module docstring); raises unless every pixel is right."""
    headers = {"Accept-Encoding": "gzip, deflate"}
    if auth:
        headers["Authorization"] = auth
    out = Opening()
    viewed = study.series[0]
    async with aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_read=120),
            connector=aiohttp.TCPConnector(limit_per_host=BROWSER_CONNECTIONS)) as session:

        async def get(url: str, accept: dict[str, str]) -> tuple[str, bytes]:
            for attempt in (1, 2):
                try:
                    async with session.get(url, headers=accept) as resp:
                        body = await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"{url}: {resp.status} {body[:200]!r}")
                        return resp.headers.get("Content-Type", ""), body
                except aiohttp.ServerDisconnectedError:
                    # Orthanc closes a keep-alive connection after 1 s idle; a request sent
                    # on it meanwhile is lost.  A browser sends it again once, so do we.
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

        async def frame(series: Series, sop: str) -> None:
            out.asked.setdefault(sop, time.monotonic())
            ctype, body = await get(f"{base}/studies/{study.uid}/series/{series.uid}/instances/"
                                    f"{sop}/frames/1", FRAME)
            (part,) = multipart.split(body, ctype)
            pixels = part.body
            if part.headers.get("content-type", "").startswith("image/jls"):
                pixels = await asyncio.to_thread(jls_pixels, pixels)  # as a viewer decodes
            if hashlib.md5(pixels).hexdigest() != series.pixels[sop]:
                raise RuntimeError(f"frame of {sop}: wrong pixels")

        async def metadata(series: Series) -> float:
            t = time.monotonic()
            _, body = await get(f"{base}/studies/{study.uid}/series/{series.uid}/metadata", JSON)
            if body.count(b'"00080018"') != len(series.sops):
                raise RuntimeError(f"metadata of {series.uid}: not every instance")
            return time.monotonic() - t

        async def thumbnail(series: Series, listed: asyncio.Task[float]) -> None:
            await listed
            await frame(series, series.sops[len(series.sops) // 2])

        out.started = t0 = time.monotonic()
        await get(f"{base}/studies?StudyInstanceUID={study.uid}&includefield={STUDY_FIELDS}", JSON)
        await get(f"{base}/studies/{study.uid}/series?includefield={SERIES_FIELDS}", JSON)
        listed = {s.uid: asyncio.create_task(metadata(s)) for s in study.series}
        thumbnails = [asyncio.create_task(thumbnail(s, listed[s.uid])) for s in study.series[1:]]
        out.metadata = await listed[viewed.uid]
        order = [viewed.sops[i] for i in middle_outwards(len(viewed.sops))]
        await frame(viewed, order[0])
        out.first_image = time.monotonic() - t0
        queue = list(reversed(order[1:]))

        async def worker() -> None:
            while queue:
                await frame(viewed, queue.pop())

        await asyncio.gather(*(worker() for _ in range(BROWSER_CONNECTIONS)))
        out.series = time.monotonic() - t0
        await asyncio.gather(*thumbnails, *listed.values())
    return out


def jls_pixels(frame: bytes) -> bytes:
    """A JPEG-LS frame (``upstream.frames_transfer_syntax``) decoded, little-endian."""
    import jpeg_ls

    data, _info = jpeg_ls.decode_buffer(frame)
    return bytes(data)


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class LinkBytes:
    viewer: int = 0
    prefetch: int = 0
    prefetch_before_first: float = 0.0
    json: int = 0

    @property
    def total(self) -> int:
        return self.viewer + self.prefetch + self.json


def timeline(exchanges: list[Exchange], study: Study, opening: Opening) -> str:
    """What crossed the link until the first image arrived, request by request."""
    sop_of = study.sop_of
    first_at = opening.started + opening.first_image
    lines = [f"    first image at {opening.first_image:.3f} s"]
    for ex in sorted(exchanges, key=lambda e: e.asked):
        if ex.asked > first_at:
            break
        parts = ex.target.split("?")[0].strip("/").split("/")
        oid = parts[1] if len(parts) >= 3 and parts[0] == "instances" else None
        what = ex.target[:90] if oid is None else \
            f"/instances/{sop_of.get(oid, oid)[-12:]}/{'/'.join(parts[2:])}"
        lines.append(f"    {ex.asked - opening.started:7.3f} → {ex.done - opening.started:7.3f} s "
                     f"{ex.bytes_down:>9} B  {ex.method} {what}")
    return "\n".join(lines)


def classify(exchanges: list[Exchange], study: Study, opening: Opening) -> LinkBytes:
    """Bytes on the link by class (module docstring).  An instance download (body or
    MD5) is the viewer's when the viewer had asked for that instance before it started."""
    sop_of = study.sop_of
    first_at = opening.started + opening.first_image
    out = LinkBytes()
    for ex in exchanges:
        parts = ex.target.split("?")[0].strip("/").split("/")
        sop = sop_of.get(parts[1]) if len(parts) >= 3 and parts[0] == "instances" else None
        if "frames" in parts:  # asked transcoded (upstream.frames_transfer_syntax)
            out.viewer += ex.bytes_down
        elif sop is None:
            out.json += ex.bytes_down
        elif opening.asked.get(sop, float("inf")) <= ex.asked:
            out.viewer += ex.bytes_down
        else:
            out.prefetch += ex.bytes_down
            span = max(ex.done - ex.asked, 1e-9)
            overlap = min(ex.done, first_at) - max(ex.asked, opening.started)
            out.prefetch_before_first += ex.bytes_down * max(0.0, min(1.0, overlap / span))
    return out


def bodies_by_encoding(encodings: collections.Counter[tuple[str, str]]) -> tuple[int, int]:
    """Instance bodies (``/instances/{id}/file``) that crossed gzipped, and as stored."""
    files = [(e, n) for (path, e), n in encodings.items()
             if path.startswith("/instances/") and path.endswith("/file")]
    gzipped = sum(n for e, n in files if e != "identity")
    return gzipped, sum(n for _, n in files) - gzipped


def quiet(wan: ThreadedWanEmulator, deadline: float) -> None:
    """Wait until nothing crossed the link for a second (prefetch done): a second opening
    is a later one."""
    end = time.monotonic() + deadline
    last = -1
    while time.monotonic() < end:
        now = wan.stats().bytes_down
        if now == last:
            return
        last = now
        time.sleep(1.0)
    raise RuntimeError("the link never went quiet")


@contextlib.contextmanager
def dicomcache(workdir: Path, orthanc: OrthancProcess, wan_port: int, prefetch: str,
               compression: str, frames_syntax: str = "") -> Iterator[tuple[str, int]]:
    """``dicomcache serve`` on a fresh cache behind the emulated link; yields its DICOMweb
    root and its pid."""
    settings = serve_settings(workdir, f"http://127.0.0.1:{wan_port}", orthanc, max_size="4GB",
                              upstream={"compression": compression,
                                        "frames_transfer_syntax": frames_syntax},
                              prefetch={"mode": prefetch})
    with Daemon(workdir, settings) as daemon:
        yield daemon.base + "/dicom-web", daemon.pid


def make_study(orthanc: OrthancProcess, slices: int) -> tuple[Study, int]:
    """A CT study of three series (``slices``, half and a quarter of it), 512x512 16-bit,
    uploaded; returns it (viewed series first) and its bytes."""
    study_uid = str(generate_uid())
    series: list[Series] = []
    total = 0
    for number, n in enumerate((slices, max(2, slices // 2), max(2, slices // 4)), start=1):
        datasets = make_ct_series(n, study_uid=study_uid, seed=1600 + number,
                                  patient_id="PFIRSTIMAGE", patient_name="FIRST^IMAGE")
        for ds in datasets:
            ds.SeriesNumber = number
            ds.SeriesDescription = f"series {number} ({n} slices)"
        blobs = [encode(ds, ExplicitVRLittleEndian) for ds in datasets]
        total += sum(map(len, blobs))
        oids = orthanc.upload(blobs)
        sops = [str(ds.SOPInstanceUID) for ds in datasets]
        series.append(Series(str(datasets[0].SeriesInstanceUID), sops,
                             dict(zip(sops, oids, strict=True)),
                             {sop: hashlib.md5(ds.PixelData).hexdigest()
                              for sop, ds in zip(sops, datasets, strict=True)}))
    return Study(study_uid, series), total


@dataclasses.dataclass
class Cell:
    mbit: float
    latency_ms: float
    direct: list[Opening] = dataclasses.field(default_factory=list)
    cold: list[Opening] = dataclasses.field(default_factory=list)
    warm: list[Opening] = dataclasses.field(default_factory=list)
    direct_bytes: list[int] = dataclasses.field(default_factory=list)
    cold_bytes: list[LinkBytes] = dataclasses.field(default_factory=list)
    #: Instance bodies of the cold opening that crossed gzipped, and as stored.
    cold_gzipped: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    #: CPU seconds: Orthanc during the direct opening; Orthanc and dicomcache during the
    #: cold opening and the prefetch after it (until the link is quiet).
    cpu: list[tuple[float, float, float]] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.mbit:g} Mbit/s, {self.latency_ms:g} ms"


def median(values: list[float]) -> float:
    return statistics.median(values)


def report(cells: list[Cell], study_bytes: int, viewed: int, settings: str) -> str:
    """The markdown tables (stdout)."""
    lines = [f"study: 3 series, {viewed} slices viewed, {study_bytes / 1e6:.0f} MB; "
             f"{settings}; medians of {len(cells[0].direct)} run(s)", "",
             "| link (one-way) | what | direct | cold | warm | cold / direct | warm / direct |",
             "|---|---|---|---|---|---|---|"]
    for c in cells:
        for label, attr in (("first image", "first_image"), ("series metadata", "metadata"),
                            ("whole series", "series")):
            d = median([getattr(o, attr) for o in c.direct])
            cold = median([getattr(o, attr) for o in c.cold])
            warm = median([getattr(o, attr) for o in c.warm])
            lines.append(f"| {c.name} | {label} | {d:.3f} s | {cold:.3f} s | {warm:.3f} s | "
                         f"**{cold / d:.2f}** | {warm / d:.3f} |")
    lines += ["", "| link (one-way) | direct: bytes | cold: viewer | prefetch (≈ before first "
              "image) | JSON | cold total / direct | cold bodies gzip / identity | CPU s: "
              "Orthanc direct / Orthanc cold / dicomcache cold |",
              "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        d = median([float(b) for b in c.direct_bytes])
        b = c.cold_bytes[len(c.cold_bytes) // 2]
        gz = " ".join(f"{g}/{i}" for g, i in c.cold_gzipped)
        cpu = " / ".join(f"{median([run[i] for run in c.cpu]):.1f}" for i in range(3))
        lines.append(f"| {c.name} | {d / 1e6:.1f} MB | {b.viewer / 1e6:.1f} MB | "
                     f"{b.prefetch / 1e6:.1f} MB ({b.prefetch_before_first / 1e6:.1f} MB) | "
                     f"{b.json / 1e6:.2f} MB | {b.total / d:.2f} | {gz} | {cpu} |")
    return "\n".join(lines)


@contextlib.contextmanager
def checkout(tree: Path | None) -> Iterator[None]:
    """Child processes started meanwhile import ``dicomcache`` from ``tree`` (``None``:
    this one): its directory on ``PYTHONPATH``, and ``-m`` not putting the working
    directory (this checkout) before it."""
    if tree is None:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PYTHONSAFEPATH")}
    os.environ.update(PYTHONPATH=str(tree), PYTHONSAFEPATH="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def timed_get(url: str, auth: str | None) -> float:
    """One metadata request as OHIF sends it, on a new connection; its seconds."""
    headers = {**JSON, "Accept-Encoding": "gzip, deflate"}
    if auth:
        headers["Authorization"] = auth
    async with aiohttp.ClientSession() as session:
        t = time.monotonic()
        async with session.get(url, headers=headers) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{url}: {resp.status} {body[:200]!r}")
        return time.monotonic() - t


def upstream_metadata_seconds(base: str) -> float:
    """Seconds dicomcache spent so far on metadata requests to Orthanc, from sending one
    to its last byte (its ``/metrics``)."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith('dicomcache_upstream_request_duration_seconds_sum{kind="metadata"}'):
                return float(line.split()[-1])
    return 0.0


def metadata_alone(args: argparse.Namespace, slices: int, link: tuple[float, float]) -> int:
    """``--metadata N`` (module docstring)."""
    with tempfile.TemporaryDirectory(prefix="first-image-") as tmp_name:
        tmp = Path(tmp_name)
        orthanc = OrthancProcess(tmp / "orthanc", overrides={"HttpCompressionEnabled": True})
        orthanc.start()
        try:
            study_uid = str(generate_uid())
            uids = []
            for i in range(args.metadata):
                datasets = make_ct_series(slices, rows=128, columns=128, study_uid=study_uid,
                                          seed=1700 + i, patient_id="PMETADATA")
                orthanc.upload(encode(ds, ExplicitVRLittleEndian) for ds in datasets)
                uids.append(str(datasets[0].SeriesInstanceUID))
            auth = "Basic " + base64.b64encode(
                f"{orthanc.username}:{orthanc.password}".encode()).decode()
            trees: list[Path | None] = [None] + ([args.baseline] if args.baseline else [])
            with ThreadedWanEmulator("127.0.0.1", orthanc.http_port) as wan, \
                    contextlib.ExitStack() as stack:
                wan.set_profile(LinkProfile(latency_ms=link[1], bandwidth_mbit=link[0]))
                daemons = []
                for n, tree in enumerate(trees):
                    settings = serve_settings(tmp / f"d{n}", f"http://127.0.0.1:{wan.port}",
                                              orthanc, max_size="1GB",
                                              upstream={"compression": args.compression},
                                              prefetch={"mode": "off"},
                                              # no confirmation in the background (at half
                                              # of it) during the run: one request each
                                              dicomweb={"metadata_fresh": 3600})
                    with checkout(tree):
                        daemons.append(stack.enter_context(Daemon(tmp / f"d{n}", settings)))
                names = ["direct", "this tree"] + [f"{args.baseline}"] * bool(args.baseline)
                seconds: dict[str, list[float]] = {name: [] for name in names}
                cpu: dict[str, list[float]] = {name: [] for name in names[1:]}
                #: Seconds from Orthanc's last byte to the viewer's (and before the request
                #: to Orthanc): dicomcache's own part, whatever Orthanc's time was.
                own: dict[str, list[float]] = {name: [] for name in names[1:]}
                for i, series in enumerate(uids):
                    path = f"/dicom-web/studies/{study_uid}/series/{series}/metadata"
                    order = list(range(len(names)))
                    order = order[i % len(order):] + order[:i % len(order)]
                    for k in order:
                        if k == 0:
                            seconds["direct"].append(asyncio.run(timed_get(
                                f"http://127.0.0.1:{wan.port}{path}", auth)))
                            continue
                        base = daemons[k - 1].base
                        upstream = upstream_metadata_seconds(base)
                        before = cpu_seconds(daemons[k - 1].pid)
                        took = asyncio.run(timed_get(base + path, None))
                        seconds[names[k]].append(took)
                        cpu[names[k]].append(cpu_seconds(daemons[k - 1].pid) - before)
                        own[names[k]].append(took - (upstream_metadata_seconds(base) - upstream))
                    print(f"  {i}: " + "  ".join(
                        f"{name} {seconds[name][-1]:.3f} s" + (
                            f" (own {own[name][-1] * 1000:.0f} ms, {cpu[name][-1] * 1000:.0f}"
                            " ms CPU)" if name in cpu else "") for name in names), file=sys.stderr)
        finally:
            orthanc.stop()
    direct = seconds["direct"]
    print(f"cold series metadata alone: {args.metadata} series of {slices} instances, "
          f"{link[0]:g} Mbit/s, {link[1]:g} ms one-way, upstream.compression = "
          f"{args.compression}; medians\n")
    print("| path | seconds | excess over direct (ms) | ratio to direct | dicomcache's own "
          "ms (beyond its request to Orthanc) | dicomcache CPU ms |")
    print("|---|---|---|---|---|---|")
    for name in names:
        excess = [(t - d) * 1000 for t, d in zip(seconds[name], direct, strict=True)]
        ratio = [t / d for t, d in zip(seconds[name], direct, strict=True)]
        ours = f"{median(own[name]) * 1000:.0f}" if name in own else "–"
        used = f"{median(cpu[name]) * 1000:.0f}" if name in cpu else "–"
        print(f"| {name} | {median(seconds[name]):.3f} | {median(excess):+.0f} | "
              f"{median(ratio):.2f} | {ours} | {used} |")
    return 0


def parse_links(text: str) -> list[tuple[float, float]]:
    links = []
    for item in text.split(","):
        mbit, _, ms = item.strip().partition("x")
        links.append((float(mbit), float(ms)))
    return links


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="40 slices, two links")
    ap.add_argument("--slices", type=int, default=None, help="slices of the viewed series (120)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--links", default=None,
                    help="MBITxONE_WAY_MS,… (default 10x20,10x80,50x20,50x80,200x20,200x80)")
    ap.add_argument("--prefetch", default="study", choices=("study", "series", "off"))
    ap.add_argument("--compression", default="auto", choices=("none", "json", "all", "auto"),
                    help="dicomcache's upstream.compression (default: the product's, auto)")
    ap.add_argument("--frames-syntax", default="", choices=("", "1.2.840.10008.1.2.4.80"),
                    help="dicomcache's upstream.frames_transfer_syntax (default: off)")
    ap.add_argument("--timeline", action="store_true",
                    help="print what crossed the link before each cold first image")
    ap.add_argument("--deadline", type=float, default=600.0, help="seconds per opening")
    ap.add_argument("--metadata", type=int, default=0, metavar="N",
                    help="measure the cold series metadata alone, over N series")
    ap.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                    help="with --metadata: also a dicomcache from this checkout")
    args = ap.parse_args()
    slices = args.slices or (40 if args.quick else 120)
    links = parse_links(args.links or ("10x20,200x80" if args.quick else
                                       "10x20,10x80,50x20,50x80,200x20,200x80"))
    if not 1 <= args.runs <= 20 or not 4 <= slices <= 1000 or not 0 <= args.metadata <= 100:
        ap.error("--runs in 1..20, --slices in 4..1000, --metadata in 0..100")
    if args.metadata:
        return metadata_alone(args, slices, links[0])

    def timed(base: str, auth: str | None = None) -> Opening:
        return asyncio.run(asyncio.wait_for(open_study(base, study, auth), args.deadline))

    with tempfile.TemporaryDirectory(prefix="first-image-") as tmp_name:
        tmp = Path(tmp_name)
        orthanc = OrthancProcess(tmp / "orthanc", overrides={"HttpCompressionEnabled": True})
        orthanc.start()
        try:
            print(f"generating and uploading the study ({slices} slices viewed)…",
                  file=sys.stderr)
            study, study_bytes = make_study(orthanc, slices)
            auth = "Basic " + base64.b64encode(
                f"{orthanc.username}:{orthanc.password}".encode()).decode()
            cells = [Cell(mbit, ms) for mbit, ms in links]
            assert orthanc.proc is not None
            orthanc_pid = orthanc.proc.pid
            with ThreadedWanEmulator("127.0.0.1", orthanc.http_port) as wan:
                direct_base = f"http://127.0.0.1:{wan.port}/dicom-web"
                n = 0
                for cell in cells:
                    wan.set_profile(LinkProfile(latency_ms=cell.latency_ms,
                                                bandwidth_mbit=cell.mbit))
                    for _ in range(args.runs):
                        wan.reset_stats()
                        orthanc_cpu = cpu_seconds(orthanc_pid)
                        cell.direct.append(timed(direct_base, auth))
                        direct_cpu = cpu_seconds(orthanc_pid) - orthanc_cpu
                        cell.direct_bytes.append(wan.stats().bytes_down)
                        n += 1
                        with dicomcache(tmp / f"c{n}", orthanc, wan.port, args.prefetch,
                                        args.compression, args.frames_syntax) as (base, pid):
                            wan.reset_stats()
                            ours, orthanc_cpu = cpu_seconds(pid), cpu_seconds(orthanc_pid)
                            cold = timed(base)
                            cell.cold.append(cold)
                            stats = wan.stats()
                            exchanges = stats.exchanges
                            cell.cold_bytes.append(classify(exchanges, study, cold))
                            cell.cold_gzipped.append(bodies_by_encoding(stats.encodings))
                            if args.timeline:
                                print(timeline(exchanges, study, cold), file=sys.stderr)
                            quiet(wan, args.deadline)
                            cell.cpu.append((direct_cpu, cpu_seconds(orthanc_pid) - orthanc_cpu,
                                             cpu_seconds(pid) - ours))
                            cell.warm.append(timed(base))
                        d, c, w = cell.direct[-1], cell.cold[-1], cell.warm[-1]
                        print(f"  {cell.name:22s} first image {d.first_image:6.2f} / "
                              f"{c.first_image:6.2f} / {w.first_image:6.3f} s   metadata "
                              f"{d.metadata:5.2f} / {c.metadata:5.2f} / {w.metadata:5.3f} s   "
                              f"series {d.series:6.2f} / {c.series:6.2f} / {w.series:6.3f} s "
                              "(direct / cold / warm)", file=sys.stderr)
        finally:
            orthanc.stop()
    print(report(cells, study_bytes, slices, f"prefetch.mode = {args.prefetch}, "
                 f"upstream.compression = {args.compression}, "
                 f"upstream.frames_transfer_syntax = {args.frames_syntax!r}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
