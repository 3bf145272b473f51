"""Link rewriting, the revalidating answer cache, DICOMweb/CORS configuration: no Orthanc."""

from __future__ import annotations

import asyncio
import gzip
import json
import math
from pathlib import Path

import pytest

from dicomcache.config import from_dict
from dicomcache.dicom.accept import accepts_gzip, accepts_json
from dicomcache.dicom.uids import orthanc_instance_id
from dicomcache.dicomweb.answers import (
    PLACEHOLDER,
    SEARCHES,
    AnswerCache,
    Cached,
    DiskCopies,
    affected,
    link_path,
    middle_instances,
    named_instances,
    normalise_json,
    relink_parts,
    relinked_bulk_data,
    rewrite_links,
    with_base,
)
from dicomcache.dicomweb.state import single_part
from dicomcache.errors import ConfigError, NotFoundUpstream, UpstreamError
from dicomcache.http.cors import allowed_origin, preflight_problem


@pytest.mark.parametrize(("url", "path"), [
    ("http://orthanc:8042/dicom-web/studies/1.2/series/3.4", "/studies/1.2/series/3.4"),
    ("https://pacs.example/custom/root/studies/1/series/2/instances/3/bulk/7fe00010",
     "/studies/1/series/2/instances/3/bulk/7fe00010"),
    ("http://h/dicom-web/studies/1/rendered?quality=90", "/studies/1/rendered?quality=90"),
    ("http://h/dicom-web/series/1", None),
    ("not a url [", None),
])
def test_link_path(url: str, path: str | None) -> None:
    assert link_path(url) == path


def orthanc_metadata(links: list[str], extra: str = "") -> bytes:
    """Series metadata laid out as Orthanc 1.10 writes it (tabs, `` : ``)."""
    items = [f'\t{{\n\t\t"00080018" : \n\t\t{{\n\t\t\t"Value" : \n\t\t\t[\n\t\t\t\t'
             f'"1.2.{i}"\n\t\t\t],\n\t\t\t"vr" : "UI"\n\t\t}},{extra}\n\t\t"7FE00010" : '
             f'\n\t\t{{\n\t\t\t"BulkDataURI" : "{link}",\n\t\t\t"vr" : "OW"\n\t\t}}\n\t}}'
             for i, link in enumerate(links)]
    return ("[\n" + ",\n".join(items) + "\n]\n").encode()


@pytest.mark.parametrize(("links", "extra", "fast"), [
    (["http://127.0.0.1:8042/dicom-web/studies/1.2/series/3/instances/4/bulk/7fe00010",
      "https://pacs.example:443/studies/1.2/series/3/instances/5/bulk/7fe00010"], "", True),
    (["http://h/dicom-web/studies/1/x/studies/2?a=b&c=%22d"], "", True),  # first /studies/
    (["http://h/dicom-web/series/1"], "", False),  # no /studies/: left, as the walk does
    (["http://h/dicom-web/studies/1#frag"], "", False),
    (["http://h/dicom-web/studies/1\\u0041"], "", False),  # an escape: the walk decides
    (["/dicom-web/studies/1"], "", False),  # relative
    # text that says BulkDataURI, and a Retrieve URL: the walk
    (["http://h/studies/1"],
     '\n\t\t"00081030" : {"Value" : ["BulkDataURI"], "vr" : "LO"},', False),
    (["http://h/studies/1"],
     '\n\t\t"00081030" : {"Value" : ["\\"BulkDataURI\\" : \\"http://h/studies/2\\""], '
     '"vr" : "LO"},', True),
    (["http://h/studies/1"],
     '\n\t\t"00081190" : {"Value" : ["http://h/studies/1"], "vr" : "UR"},', False),
    (["http://h/studies/1"],
     '\n\t\t"00081030" : {"Value" : ["a : b\\tc http://h/studies/9"], "vr" : "LO"},', True),
])
def test_bulk_data_links_relinked_in_the_text_as_the_walk_does(
        links: list[str], extra: str, fast: bool) -> None:
    text = orthanc_metadata(links, extra)
    walked = json.loads(normalise_json(text))
    out = relinked_bulk_data(text)
    assert (out is not None) is fast
    if out is not None:
        assert json.loads(out) == walked
        base = "http://c:8080/dicom-web"
        assert json.loads(with_base(out, base)) == json.loads(with_base(normalise_json(text),
                                                                         base))
        assert b"\t" not in out and b"\n" not in out


def test_rewrite_links_everywhere_links_live() -> None:
    doc = [{
        "00081190": {"vr": "UR", "Value": ["http://o:1/dicom-web/studies/1"]},
        "7FE00010": {"vr": "OW", "BulkDataURI": "http://o:1/dicom-web/studies/1/series/2/"
                                                "instances/3/bulk/7fe00010"},
        "00081115": {"vr": "SQ", "Value": [{
            "00081190": {"vr": "UR", "Value": ["http://o:1/dicom-web/studies/1/series/2"]},
            "00420011": {"vr": "OB", "BulkDataURI": "http://o:1/dicom-web/studies/1/series/2/"
                                                    "instances/4/bulk/00420011"}}]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "http://o:1/dicom-web/studies/9"}]},
        "00080018": {"vr": "UI", "Value": ["1.2.3"]},
    }]
    assert rewrite_links(doc) == 4
    text = json.dumps(doc)
    assert "http://o:1" in text  # only inside the patient name, which is not a link
    body = normalise_json(json.dumps([{"00081190": {"vr": "UR", "Value": [
        "http://o:1/dicom-web/studies/1"]}}]).encode())
    assert with_base(body, "https://v.example/dicom-web") == \
        b'[{"00081190":{"vr":"UR","Value":["https://v.example/dicom-web/studies/1"]}}]'
    # an escaped placeholder (as json.dumps with ensure_ascii writes it) is replaced too
    escaped = json.dumps({"x": PLACEHOLDER + "/studies/1"}).encode()
    assert with_base(escaped, "http://b") == b'{"x": "http://b/studies/1"}'


def _dataset(patient: str | None, study: str, series: str, sop: str) -> dict[str, object]:
    ds: dict[str, object] = {"0020000D": {"vr": "UI", "Value": [study]},
                             "0020000E": {"vr": "UI", "Value": [series]},
                             "00080018": {"vr": "UI", "Value": [sop]}}
    if patient is not None:
        ds["00100020"] = {"vr": "LO", "Value": [patient]}
    return ds


@pytest.mark.parametrize(("doc", "expected"), [
    ([_dataset("P1", "1.2", "1.2.3", "1.2.3.4")],
     {("1.2.3.4", "1.2", "1.2.3"): [orthanc_instance_id("P1", "1.2", "1.2.3", "1.2.3.4")]}),
    # No Patient ID: Orthanc hashes an empty one.
    ([_dataset(None, "1.2", "1.2.3", "1.2.3.4")],
     {("1.2.3.4", "1.2", "1.2.3"): [orthanc_instance_id("", "1.2", "1.2.3", "1.2.3.4")]}),
    # One SOP Instance UID under two patients: two instances, an ambiguity kept as such.
    ([_dataset("P1", "1.2", "1.2.3", "1.2.3.4"), _dataset("P2", "1.2", "1.2.3", "1.2.3.4"),
      _dataset("P1", "1.2", "1.2.3", "1.2.3.4")],
     {("1.2.3.4", "1.2", "1.2.3"): [orthanc_instance_id("P1", "1.2", "1.2.3", "1.2.3.4"),
                                    orthanc_instance_id("P2", "1.2", "1.2.3", "1.2.3.4")]}),
    # UIDs that are not UIDs, or missing, name nothing.
    ([_dataset("P1", "1.2", "1.2.3", "../../etc"), _dataset("P1", "", "1.2.3", "1.2.3.5"),
      {"00080018": {"vr": "UI"}}, "not a data set", {"0020000D": "1.2"}], {}),
    ({"not": "a list"}, {}),
])
def test_named_instances(doc: object, expected: dict[tuple[str, str, str], list[str]]) -> None:
    assert named_instances(doc) == expected


def _slice(number: object, sop: str) -> dict[str, object]:
    ds = _dataset("P1", "1.2", "1.2.3", sop)
    if number is not None:
        ds["00200013"] = {"vr": "IS", "Value": [number]}
    return ds


def _slices(*numbers: object) -> list[dict[str, object]]:
    return [_slice(n, f"1.2.3.{i}") for i, n in enumerate(numbers, start=10)]


def _uids(*sops: str) -> list[tuple[str, str, str]]:
    return [(sop, "1.2", "1.2.3") for sop in sops]


@pytest.mark.parametrize(("doc", "expected"), [
    # Odd: the middle one, whatever order Orthanc listed them in.
    (_slices(3, 1, 2), _uids("1.2.3.12")),
    (_slices(5, 4, 3, 2, 1), _uids("1.2.3.12")),
    # Even: the upper middle (index n // 2), as OHIF opens it.
    (_slices(1, 2, 3, 4), _uids("1.2.3.12")),
    (_slices(4, 3, 2, 1), _uids("1.2.3.11")),
    # Numbers as strings (IS written as text), as decimals; one slice; none.
    (_slices("2", "1", "3"), _uids("1.2.3.10")),
    (_slices(1.5, 0.5, 2.5), _uids("1.2.3.10")),
    (_slices(7), _uids("1.2.3.10")),
    ([], []),
    # Equal numbers: the SOP Instance UID decides, so the answer is the same every time.
    (_slices(1, 1, 1), _uids("1.2.3.11")),
    # An instance without a number, with a number that is not one, or with a bad UID:
    # no guess from incomplete data.
    (_slices(1, None, 3), []),
    (_slices(1, "two", 3), []),
    (_slices(1, True, 3), []),
    (_slices(1, float("nan"), 3), []),
    ([*_slices(1, 2), _slice(3, "../etc")], []),
    ([*_slices(1, 2), "not a data set"], []),
    ({"not": "a list"}, []),
])
def test_middle_instances(doc: object, expected: list[tuple[str, str, str]]) -> None:
    assert middle_instances(doc) == expected


def test_normalise_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        normalise_json(b"[{")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def cached(body: bytes, clock: Clock, fresh: float, validator: object = None) -> Cached:
    return Cached(body, "application/dicom+json", clock(), fresh, validator=validator)


async def test_answer_cache_fresh_stale_and_errors() -> None:
    clock = Clock()
    cache = AnswerCache(1 << 20, stale_if_error=60, clock=clock)
    calls = []

    async def load(old: Cached | None) -> Cached:
        calls.append(old)
        # Time passing: a load takes a while, as a request to Orthanc does, so the
        # other callers find it in flight.
        await asyncio.sleep(0.01)
        return cached(b"v%d" % len(calls), clock, 10)

    # concurrent first requests: one load
    results = await asyncio.gather(*(cache.get("k", load) for _ in range(5)))
    assert len(calls) == 1 and {r[0].body for r in results} == {b"v1"}
    clock.now += 5
    assert (await cache.get("k", load))[0].body == b"v1" and len(calls) == 1  # fresh
    clock.now += 6
    entry, stale = await cache.get("k", load)  # stale: revalidated
    assert (entry.body, stale) == (b"v2", False) and calls[-1] is not None

    async def down(old: Cached | None) -> Cached:
        raise UpstreamError("connect", "refused")

    clock.now += 30
    entry, stale = await cache.get("k", down)
    assert (entry.body, stale) == (b"v2", True)
    clock.now += 41  # over 60 s past stale: too old to stand in
    with pytest.raises(UpstreamError):
        await cache.get("k", down)
    with pytest.raises(UpstreamError):
        await cache.get("new", down)

    async def gone(old: Cached | None) -> Cached:
        raise NotFoundUpstream(404, "deleted")

    with pytest.raises(NotFoundUpstream):
        await cache.get("k", gone)
    assert cache.peek("k") is None


async def test_refresh_loads_again_while_the_copy_is_served() -> None:
    """A first answer confirmed ahead of time: viewers keep getting the copy in hand
    meanwhile (nobody waits); a copy Orthanc no longer has is dropped; one it cannot be
    asked about now stays for its own revalidation."""
    clock = Clock()
    cache = AnswerCache(1 << 20, stale_if_error=60, clock=clock)
    release = asyncio.Event()

    async def first(old: Cached | None) -> Cached:
        return cached(b"v1", clock, 10)

    async def again(old: Cached | None) -> Cached:
        assert old is not None and old.body == b"v1"
        await release.wait()
        return cached(b"v2", clock, 10, validator="list")

    await cache.get("k", first)
    await cache.refresh("absent", again)  # nothing in hand: nothing to do
    refreshing = asyncio.create_task(cache.refresh("k", again))
    await asyncio.sleep(0.01)
    entry, stale = await asyncio.wait_for(cache.get("k", again), 1)  # no wait for it
    assert (entry.body, stale) == (b"v1", False)
    release.set()
    await refreshing
    entry, _ = await cache.get("k", first)
    assert (entry.body, entry.validator) == (b"v2", "list")

    async def down(old: Cached | None) -> Cached:
        raise UpstreamError("connect", "refused")

    async def gone(old: Cached | None) -> Cached:
        raise NotFoundUpstream(404, "deleted")

    await cache.refresh("k", down)
    assert cache.peek("k") is entry
    await cache.refresh("k", gone)
    assert cache.peek("k") is None


async def test_answer_cache_bounded_and_revalidated_copies_keep_identity() -> None:
    clock = Clock()
    cache = AnswerCache(4000, stale_if_error=0, clock=clock)
    for i in range(10):
        cache.put(f"k{i}", cached(b"x" * 300, clock, 10))
    assert cache.bytes <= 4000 and cache.peek("k9") is not None and cache.peek("k0") is None
    cache.put("huge", cached(b"x" * 3000, clock, 10))  # over a quarter: not kept
    assert cache.peek("huge") is None
    a = cached(b"body", clock, 10, validator=("a",))
    b = a.revalidated(clock.now + 50)
    assert b.digest == a.digest and b.validator == ("a",) and b.fresh(clock.now + 55)
    assert a.etag("http://x", False) != a.etag("http://y", False) != a.etag("http://y", True)


async def test_render_relinks_and_gzips() -> None:
    body = normalise_json(json.dumps([{"00081190": {"vr": "UR", "Value": [
        "http://o/dicom-web/studies/1"]}}] * 100).encode())
    entry = Cached(body, "application/dicom+json", 0.0, 10, has_links=True)
    plain = await entry.render("http://a/dicom-web", False)
    assert b"http://a/dicom-web/studies/1" in plain and PLACEHOLDER.encode() not in plain
    assert gzip.decompress(await entry.render("http://a/dicom-web", True)) == plain
    assert await entry.render("http://a/dicom-web", False) is plain  # memoised


@pytest.mark.parametrize(("accept", "ok"), [
    (None, True), ("application/dicom+json", True), ("application/json, text/plain", True),
    ("*/*", True), ('multipart/related; type="application/dicom+xml"', False),
])
def test_accepts_json(accept: str | None, ok: bool) -> None:
    assert accepts_json(accept) is ok


@pytest.mark.parametrize(("header", "ok"), [
    ("gzip, deflate, br", True), ("br;q=1, gzip;q=0.5", True), ("gzip;q=0", False),
    ("identity", False), (None, False), ("*", True),
])
def test_accepts_gzip(header: str | None, ok: bool) -> None:
    assert accepts_gzip(header) is ok


def test_multipart_checks() -> None:
    ct = 'multipart/related; type="application/dicom"; boundary=B'
    good = b"--B\r\nContent-Type: application/dicom\r\nContent-Length: 3\r\n\r\nabc\r\n--B--\r\n"
    assert single_part(good, ct) == b"abc"
    for bad in (good[:-3], good.replace(b"Length: 3", b"Length: 4"), b"", good[2:]):
        with pytest.raises(ValueError):  # IntegrityError is a ValueError
            single_part(bad, ct)
    frames = (b"--B\r\nContent-Location: http://o:1/dicom-web/studies/1/series/2/instances/3/"
              b"frames/1\r\nContent-Length: 2\r\n\r\nxy\r\n--B--\r\n")
    assert relink_parts(frames, ct, "https://v/dicom-web") == frames.replace(
        b"http://o:1/dicom-web", b"https://v/dicom-web")
    with pytest.raises(ValueError):
        relink_parts(frames[:30], ct, "https://v/dicom-web")


def test_config_sections() -> None:
    s = from_dict({"dicomweb": {"metadata_fresh": 2, "public_url": "https://c.example/pacs/",
                                "memory_size": "64MiB"},
                   "cors": {"allowed_origins": ["https://ohif.example", "http://localhost:3000"]}})
    assert s.dicomweb.metadata_fresh == 2.0 and s.dicomweb.memory_size == 64 << 20
    assert s.dicomweb.public_url == "https://c.example/pacs"
    assert s.cors.allowed_origins == ("https://ohif.example", "http://localhost:3000")
    assert from_dict({}).cors.allowed_origins == ()
    with pytest.raises(ConfigError) as err:
        from_dict({"dicomweb": {"metadata_fresh": 0, "stale_if_error": -1, "memory_size": "1KB",
                                "retrieve_concurrency": 0, "public_url": "ftp://x",
                                "typo": 1},
                   "cors": {"allowed_origins": ["https://ohif.example/path", "ohif"],
                            "max_age": -1}})
    keys = {k for k, _ in err.value.problems}
    assert keys == {"dicomweb.metadata_fresh", "dicomweb.stale_if_error", "dicomweb.memory_size",
                    "dicomweb.retrieve_concurrency", "dicomweb.public_url", "dicomweb.typo",
                    "cors.allowed_origins", "cors.max_age"}


def test_cors_decisions() -> None:
    s = from_dict({"cors": {"allowed_origins": ["https://ohif.example"]}}).cors
    assert allowed_origin(s, "https://ohif.example") == "https://ohif.example"
    assert allowed_origin(s, "https://evil.example") is None
    assert allowed_origin(from_dict({}).cors, "https://ohif.example") is None
    star = from_dict({"cors": {"allowed_origins": ["*"]}}).cors
    assert allowed_origin(star, "https://anything.example") == "*"
    assert preflight_problem(s, "https://ohif.example", "GET", "Authorization, Range") is None
    assert preflight_problem(s, "https://ohif.example", "POST", "")
    assert preflight_problem(s, "https://ohif.example", "GET", "X-Evil")
    assert preflight_problem(s, None, "GET", "")


def test_disk_copies_roundtrip_and_bounds(tmp_path: Path) -> None:
    disk = DiskCopies(tmp_path / "dw", max_bytes=3000)
    entry = Cached(b"[1]", "application/dicom+json", 50.0, 10.0, validator=[["a"], "t"],
                   value=["oid", ["i1"]], has_links=True)
    disk.save("json:/x", "1.2", entry, wall_now=1000.0, mono_now=60.0)  # validated 10 s ago
    back = disk.load("json:/x", "1.2", wall_now=1005.0, mono_now=500.0)
    assert back is not None
    assert (back.body, back.validator, back.value, back.has_links) == \
        (b"[1]", [["a"], "t"], ["oid", ["i1"]], True)
    assert back.validated_at == pytest.approx(485.0)  # 15 s before mono_now
    assert disk.load("json:/x", "1.3", 1005.0, 500.0) is None  # another study's key
    forever = Cached(b"{}", "application/dicom+json", 0.0, math.inf)
    disk.save("json:/i", "1.2", forever, 1000.0, 0.0)
    assert disk.load("json:/i", "1.2", 2000.0, 0.0).fresh_for == math.inf  # type: ignore[union-attr]
    assert disk.load("json:/missing", "1.2", 0, 0) is None
    disk.path("json:/x", "1.2").write_bytes(b"not json\n")
    assert disk.load("json:/x", "1.2", 0, 0) is None
    for i in range(10):
        disk.save(f"k{i}", f"9.{i}", Cached(b"x" * 1000, "t", 0.0, 1.0), 0, 0)
    disk.prune()
    assert sum(p.stat().st_size for p in (tmp_path / "dw").rglob("*") if p.is_file()) <= 3000
    assert all(p.is_dir() for p in (tmp_path / "dw").iterdir())  # empty groups removed too
    assert len(list((tmp_path / "dw").iterdir())) <= 3


def test_disk_copies_are_laid_out_by_study_and_forgotten_by_directory(tmp_path: Path) -> None:
    disk = DiskCopies(tmp_path / "dw", max_bytes=1 << 20)
    body = Cached(b'[{"00100010":{"vr":"PN","Value":[{"Alphabetic":"DOE^JANE"}]}}]',
                  "application/dicom+json", 0.0, 10.0)
    for key, study in (("json:/a", "1.2"), ("list:1.2/", "1.2"), ("json:/b", "1.3"),
                       ("qido:/dicom-web/studies", None), ("qido:/dicom-web/studies/1.3/series",
                                                           None)):
        disk.save(key, study, body, 0.0, 0.0)
    assert disk.path("json:/a", "1.2").parent == disk.group("1.2") != disk.group("1.3")
    assert disk.group(None).name == SEARCHES
    assert "1.2" not in str(disk.path("json:/a", "1.2"))  # names are hashes, never data
    disk.forget("1.2")  # the study and every search (they may list it); not the others
    assert not disk.group("1.2").exists() and not disk.group(None).exists()
    assert disk.load("json:/a", "1.2", 0, 0) is None
    assert disk.load("json:/b", "1.3", 0, 0) is not None
    disk.forget("7.7")  # nothing of it: fine
    disk.forget(None)  # every study
    assert list((tmp_path / "dw").iterdir()) == []
    disk.forget(None)


def test_disk_copies_of_the_flat_layout_are_never_served(tmp_path: Path) -> None:
    """Before the per-study layout every copy sat in the directory itself: those files are
    not read and are removed at start (they may hold a study removed since)."""
    import hashlib
    import json as json_

    directory = tmp_path / "dw"
    directory.mkdir()
    old = directory / hashlib.sha256(b"json:/x").hexdigest()[:40]
    old.write_bytes(json_.dumps({"key": "json:/x", "content_type": "t", "validated": 0.0,
                                 "fresh_for": None}).encode() + b"\n[1]")
    disk = DiskCopies(directory, max_bytes=1 << 20)
    assert disk.load("json:/x", None, 0, 0) is None and disk.load("json:/x", "1.2", 0, 0) is None
    disk.save("json:/y", "1.2", Cached(b"[2]", "t", 0.0, 1.0), 0, 0)
    (disk.group("1.2") / "x.tmp").write_bytes(b"half")
    assert disk.prune() == 2
    assert not old.exists() and disk.load("json:/y", "1.2", 0, 0) is not None


@pytest.mark.parametrize(("changed", "study", "touched"), [
    ("1.2", "1.2", True),    # the study itself
    ("1.2", "1.3", False),   # another study
    ("1.2", None, True),     # a search: it may list the study
    (None, "1.3", True),     # every study
    (None, None, True),
])
def test_affected(changed: str | None, study: str | None, touched: bool) -> None:
    assert affected(changed, study) is touched


async def test_expiry_is_one_shot_and_stale_if_error_still_applies() -> None:
    clock = Clock()
    cache = AnswerCache(1 << 20, stale_if_error=60, clock=clock)
    loads: list[Cached | None] = []

    async def load(old: Cached | None) -> Cached:
        loads.append(old)
        return old.revalidated(clock()) if old is not None else cached(b"v", clock, 10)

    async def down(old: Cached | None) -> Cached:
        raise UpstreamError("connect", "refused")

    await cache.get("k", load, study="1.2")
    assert cache.expire("1.3") == 0 and cache.expire("1.2") == 1
    await cache.get("k", load, study="1.2")  # revalidated once
    assert len(loads) == 2
    clock.now += 9
    await cache.get("k", load, study="1.2")  # fresh for its usual time again
    assert len(loads) == 2
    cache.expire(None)
    clock.now += 30
    entry, stale = await cache.get("k", down, study="1.2")  # expired 30 s ago: stands in
    assert stale and entry.body == b"v"
    clock.now += 31
    with pytest.raises(UpstreamError):
        await cache.get("k", down, study="1.2")


async def test_forget_drops_a_study_and_every_search_never_stale(tmp_path: Path) -> None:
    clock = Clock()
    disk = DiskCopies(tmp_path / "dw", 1 << 20)
    cache = AnswerCache(1 << 20, stale_if_error=600, clock=clock, disk=disk)

    async def load(old: Cached | None) -> Cached:
        return cached(b"v", clock, 10)

    async def down(old: Cached | None) -> Cached:
        raise UpstreamError("connect", "refused")

    for key, study in (("a", "1.2"), ("b", "1.3"), ("q", None)):
        await cache.get(key, load, study=study)
    assert await cache.forget("1.2") == 2
    assert cache.peek("a") is None and cache.peek("q") is None and cache.peek("b") is not None
    for key, study in (("a", "1.2"), ("q", None)):
        with pytest.raises(UpstreamError):  # not from memory, not from disk
            await cache.get(key, down, study=study)
    clock.now += 20
    assert (await cache.get("b", down, study="1.3"))[1]  # the other study's copy stands in
    assert await cache.forget(None) == 1
    with pytest.raises(UpstreamError):
        await cache.get("b", down, study="1.3")


async def test_a_load_under_way_when_its_study_is_removed_is_not_kept(tmp_path: Path) -> None:
    clock = Clock()
    disk = DiskCopies(tmp_path / "dw", 1 << 20)
    cache = AnswerCache(1 << 20, stale_if_error=600, clock=clock, disk=disk)
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(old: Cached | None) -> Cached:
        started.set()
        await release.wait()
        return cached(b"before", clock, 10)

    pending = asyncio.ensure_future(cache.get("a", slow, study="1.2"))
    await started.wait()
    await cache.forget("1.2")
    release.set()
    assert (await pending)[0].body == b"before"  # who asked before the removal is answered
    assert cache.peek("a") is None and not disk.group("1.2").exists()

    # an expiry while a load is under way: kept, but stale at once
    started.clear()
    release.clear()
    pending = asyncio.ensure_future(cache.get("a", slow, study="1.2"))
    await started.wait()
    cache.expire("1.2")
    release.set()
    await pending
    entry = cache.peek("a")
    assert entry is not None and not entry.fresh(clock())


async def test_memoised_variants_never_hold_more_than_the_cache_charges() -> None:
    """Before: up to four per-host copies of an answer were kept while the cache charged
    one (issue 15: 240 requests under other host names took a process from 116 to
    554 MiB while the metadata bound said it held 64).  Now the variants stay within
    what ``size`` charges, whatever the hosts and encodings asked."""
    # As in a series' metadata: a few KiB of tags per instance, one link each.
    body = normalise_json(json.dumps([{
        "00081190": {"vr": "UR", "Value": [f"http://o/dicom-web/studies/1/series/2/"
                                           f"instances/{i}"]},
        "00204000": {"vr": "LT", "Value": [f"slice {i} " + "x" * 2000]},
    } for i in range(200)]).encode())
    entry = Cached(body, "application/dicom+json", 0.0, 10, has_links=True)
    charged = entry.size
    for i in range(10):
        for gzipped in (False, True):
            out = await entry.render(f"https://viewer-{i}.clinic.example:8443/dicom-web",
                                     gzipped)
            assert (b"viewer-%d" % i) in (gzip.decompress(out) if gzipped else out)
        held = sum(len(v) for v in entry._variants.values())
        assert len(body) + held + 256 <= charged == entry.size
    # One site's host, plain and gzipped, is still memoised.
    plain = await entry.render("https://viewer-9.clinic.example:8443/dicom-web", False)
    assert await entry.render("https://viewer-9.clinic.example:8443/dicom-web", False) is plain


async def test_disk_copies_are_written_after_the_answer_never_for_a_removed_study(
        tmp_path: Path) -> None:
    """A disk copy is written once the answer is given (the viewer does not wait for
    it); :meth:`AnswerCache.flush` waits for it.  A study removed right after its answer
    was given, whether or not its copy had started, has no copy left."""
    clock = Clock()
    disk = DiskCopies(tmp_path / "dw", 1 << 20)
    cache = AnswerCache(1 << 20, stale_if_error=600, clock=clock, disk=disk)

    async def load(old: Cached | None) -> Cached:
        return cached(b"v", clock, 10)

    entry, _ = await cache.get("a", load, study="1.2")
    await cache.flush()
    back = await asyncio.to_thread(disk.load, "a", "1.2", 0.0, 0.0)
    assert back is not None and back.body == entry.body
    for removed in ("1.3", None):
        await cache.get("b", load, study="1.3")
        await cache.forget(removed)  # the copy's write may or may not have begun
        await cache.flush()
        assert not await asyncio.to_thread(disk.group("1.3").exists)
    # A slow disk: the answer is given while its copy waits behind the lock.
    async with cache._disk_lock:
        entry, _ = await cache.get("c", load, study="1.4")
        assert entry.body == b"v"
        assert not await asyncio.to_thread(disk.path("c", "1.4").exists)
    await cache.flush()
    assert await asyncio.to_thread(disk.path("c", "1.4").exists)


def test_disk_copies_know_which_keys_they_hold(tmp_path: Path) -> None:
    """Once listed (:meth:`DiskCopies.prune`, at start), a key without a copy is known to
    have none without touching the disk; saves, discards and removals keep the list."""
    disk = DiskCopies(tmp_path / "dw", 1 << 20)
    assert disk.may_hold("json:/a", "1.2")  # not listed yet: it may
    disk.save("json:/a", "1.2", Cached(b"[1]", "t", 0.0, 1.0), 0, 0)
    again = DiskCopies(tmp_path / "dw", 1 << 20)  # a restart
    again.prune()
    assert again.may_hold("json:/a", "1.2") and not again.may_hold("json:/b", "1.2")
    again.save("json:/b", "1.2", Cached(b"[2]", "t", 0.0, 1.0), 0, 0)
    again.save("json:/q", None, Cached(b"[3]", "t", 0.0, 1.0), 0, 0)
    again.save("json:/c", "1.3", Cached(b"[4]", "t", 0.0, 1.0), 0, 0)
    assert all(again.may_hold(k, s) for k, s in (("json:/b", "1.2"), ("json:/q", None)))
    again.discard("json:/a", "1.2")
    assert not again.may_hold("json:/a", "1.2") and again.may_hold("json:/b", "1.2")
    again.forget("1.2")  # the study and every search
    assert not again.may_hold("json:/b", "1.2") and not again.may_hold("json:/q", None)
    assert again.may_hold("json:/c", "1.3")
    again.forget(None)
    assert not again.may_hold("json:/c", "1.3")
    empty = DiskCopies(tmp_path / "none", 1 << 20)
    empty.prune()
    assert not empty.may_hold("json:/a", "1.2")
