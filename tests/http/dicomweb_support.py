"""Helpers shared by the DICOMweb tests: strict multipart parsing, Orthanc's own answers."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.dicomweb.answers import link_path
from tests.conftest import Sample

ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def split_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """Every part of a complete multipart body (asserts the framing and each length)."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    assert m, content_type
    b = m.group(1).encode()
    pos = 0
    out = []
    while True:
        if body.startswith(b"--" + b + b"--\r\n", pos):
            assert pos + len(b) + 6 == len(body), "bytes after the closing boundary"
            return out
        assert body.startswith(b"--" + b + b"\r\n", pos), f"no boundary at {pos}"
        end = body.index(b"\r\n\r\n", pos)
        lines = body[pos + len(b) + 4:end].decode().split("\r\n")
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines)}
        start = end + 4
        if "content-length" in headers:
            stop = start + int(headers["content-length"])
        else:
            stop = body.index(b"\r\n--" + b, start)
        assert body[stop:stop + 2] == b"\r\n"
        out.append((headers, body[start:stop]))
        pos = stop + 2


def orthanc_answer(orthanc: OrthancProcess, path: str, headers: dict[str, str] | None = None
                   ) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(orthanc.url + path)
    req.add_header("Authorization", orthanc.auth_header)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def unlink(doc: Any, expect_base: str | None = None) -> Any:
    """A DICOM JSON document with every link reduced to its path (asserting its base)."""
    if isinstance(doc, list):
        return [unlink(d, expect_base) for d in doc]
    if isinstance(doc, dict):
        out = {}
        for k, v in doc.items():
            if k == "BulkDataURI" or (k == "Value" and doc.get("vr") == "UR"):
                urls = v if isinstance(v, list) else [v]
                paths = []
                for url in urls:
                    path = link_path(url)
                    assert path is not None, url
                    if expect_base is not None:
                        assert url == expect_base + path, (url, expect_base)
                    paths.append(path)
                out[k] = paths if isinstance(v, list) else paths[0]
            else:
                out[k] = unlink(v, expect_base)
        return out
    return doc


def links_of(body: bytes) -> set[str]:
    return set(re.findall(r'"(https?://[^"]+)"', body.decode()))


def json_of(body: bytes) -> Any:
    return json.loads(body)


def series_path(s: Sample) -> str:
    return f"/dicom-web/studies/{s.study}/series/{s.series}"


async def get_parts(client: TestClient, path: str, accept: str | None
                    ) -> tuple[aiohttp.ClientResponse, list[tuple[dict[str, str], bytes]]]:
    """A 200 multipart answer and its parts (framing and lengths asserted)."""
    resp = await client.get(path, headers={"Accept": accept} if accept else {})
    assert resp.status == 200, await resp.text()
    return resp, split_multipart(await resp.read(), resp.headers["Content-Type"])
