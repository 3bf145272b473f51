"""Cache-hit throughput: dicomcache vs nginx (sendfile) vs Orthanc direct, same run.

Warms dicomcache with 200 generated 512 KiB CT instances from a real Orthanc,
writes the same files for nginx, then drives each server with ``wrk`` (64
connections, cycling through the 200 URLs) and prints MB/s, p99 latency and
the ratio to nginx.  Everything listens on 127.0.0.1 and stops by itself.

    ./run bench bench/proxy_hits.py [--seconds 10] [--connections 64] [--profile]
                                    [--auth basic]

``--auth basic``: viewers log in (a users file, HTTP Basic on every request), as a
clinic on its network runs it; the audit trail is written in every mode.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _daemon import Daemon, serve_settings, stop  # noqa: E402
from dicomcache.devtools.orthanc import OrthancProcess, free_port, loopback_env, wait_http  # noqa: E402
from dicomcache.devtools.samples import encode, make_ct_series  # noqa: E402

N = 200


def wrk(base: str, paths: list[str], seconds: int, connections: int, workdir: Path,
        headers: dict[str, str] | None = None) -> dict[str, float]:
    script = workdir / "paths.lua"
    lua_paths = ",".join(json.dumps(p) for p in paths)
    lua_headers = "".join(f'wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n'
                          for k, v in (headers or {}).items())
    script.write_text(textwrap.dedent(f"""
        local paths = {{{lua_paths}}}
        local i = 0
        {lua_headers}
        request = function()
          i = i % #paths + 1
          return wrk.format("GET", paths[i])
        end
        done = function(summary, latency, requests)
          io.write(string.format("RESULT %d %d %d %f %f\\n", summary.requests, summary.bytes,
            summary.duration, latency:percentile(99), latency:percentile(50)))
          io.write(string.format("ERRORS %d %d %d %d %d\\n", summary.errors.connect,
            summary.errors.read, summary.errors.write, summary.errors.status,
            summary.errors.timeout))
        end
    """))
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
                          "-s", str(script), base], capture_output=True, text=True, check=True,
                         timeout=seconds + 60).stdout
    m = re.search(r"RESULT (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+)", out)
    e = re.search(r"ERRORS (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    assert m and e, out
    requests, nbytes, micros = int(m[1]), int(m[2]), int(m[3])
    return {"requests": requests, "MB/s": nbytes / micros, "req/s": requests / micros * 1e6,
            "p99_ms": float(m[4]) / 1000, "p50_ms": float(m[5]) / 1000,
            "errors": sum(int(x) for x in e.groups())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="py-spy dump the proxy during load")
    ap.add_argument("--auth", choices=("none", "basic"), default="none",
                    help="basic: every request carries a users-file login")
    args = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"{tool} is missing: ./run bench installs it (apt)")
    work = Path(tempfile.mkdtemp(prefix="dicomcache-bench-"))
    work.chmod(0o755)  # nginx workers drop root privileges and must read the files
    procs: list[subprocess.Popen[bytes]] = []
    daemon: Daemon | None = None
    orthanc = OrthancProcess(work / "orthanc")
    try:
        orthanc.start()
        datasets = make_ct_series(N, seed=5)
        blobs = [encode(ds, ds.file_meta.TransferSyntaxUID) for ds in datasets]
        t = time.monotonic()
        ids = orthanc.upload(blobs)
        print(f"uploaded {N} instances of {len(blobs[0]) / 1024:.0f} KiB "
              f"in {time.monotonic() - t:.1f} s", flush=True)

        # dicomcache, as users run it
        settings = serve_settings(work, orthanc.url, orthanc, max_size="2GiB")
        viewer_headers: dict[str, str] = {}
        if args.auth == "basic":
            settings["auth"] = {"mode": "basic", "users_file": str(work / "users")}
        daemon = Daemon(work, settings, config_name="dicomcache.toml")
        if args.auth == "basic":
            subprocess.run([sys.executable, "-m", "dicomcache", "users", "add", "bench",
                            "--config", str(daemon.config)], input="bench-password-1\n",
                           text=True, cwd=ROOT, check=True)
            token = base64.b64encode(b"bench:bench-password-1").decode()
            viewer_headers = {"Authorization": f"Basic {token}"}
        daemon.start()
        base = daemon.base
        paths = [f"/instances/{i}/file" for i in ids]
        t = time.monotonic()
        for p in paths:
            urllib.request.urlopen(urllib.request.Request(base + p,
                                                          headers=viewer_headers)).read()
        print(f"warmed dicomcache (cold misses) in {time.monotonic() - t:.1f} s", flush=True)

        # nginx serving the same files with sendfile
        www = work / "www" / "instances"
        for oid, blob in zip(ids, blobs, strict=True):
            (www / oid).mkdir(parents=True)
            (www / oid / "file").write_bytes(blob)
        # nginx as usually deployed (one worker per core), and with one worker
        # (the same CPU budget as dicomcache's single event loop).
        nginx_bases = {}
        for label, workers in (("nginx", "auto"), ("nginx-1w", "1")):
            nport = free_port()
            conf = work / f"{label}.conf"
            conf.write_text(textwrap.dedent(f"""
                worker_processes {workers};
                pid {work}/{label}.pid;
                error_log {work}/{label}-error.log;
                events {{ worker_connections 1024; }}
                http {{
                  access_log off;
                  sendfile on; tcp_nopush on; tcp_nodelay on;
                  keepalive_requests 100000;
                  default_type application/dicom;
                  server {{ listen 127.0.0.1:{nport}; root {work}/www; }}
                }}
            """))
            procs.append(subprocess.Popen(["/usr/sbin/nginx", "-c", str(conf),
                                           "-g", "daemon off;"], env=loopback_env()))
            nginx_bases[label] = f"http://127.0.0.1:{nport}"
            wait_http(nginx_bases[label] + paths[0])

        results = {}
        for name, url, headers in (("nginx", nginx_bases["nginx"], None),
                                   ("nginx-1w", nginx_bases["nginx-1w"], None),
                                   ("dicomcache", base, viewer_headers or None),
                                   ("orthanc", orthanc.url,
                                    {"Authorization": orthanc.auth_header})):
            if args.profile and name == "dicomcache":
                spy = subprocess.Popen(["py-spy", "record", "-d", str(args.seconds), "-f", "raw",
                                        "--threads", "-o", str(work / "profile.txt"),
                                        "-p", str(daemon.pid)])
            results[name] = wrk(url, paths, args.seconds, args.connections, work, headers)
            r = results[name]
            print(f"{name:11s} {r['MB/s']:8.0f} MB/s {r['req/s']:7.0f} req/s "
                  f"p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  errors {r['errors']}",
                  flush=True)
            if args.profile and name == "dicomcache":
                spy.wait()
                print(f"profile: {work / 'profile.txt'}")
        ratio = results["dicomcache"]["MB/s"] / results["nginx"]["MB/s"]
        print(f"dicomcache / nginx throughput = {ratio:.2f} (goal >= 0.6)")
        print(f"dicomcache / nginx with 1 worker = "
              f"{results['dicomcache']['MB/s'] / results['nginx-1w']['MB/s']:.2f}")
        print(f"dicomcache / orthanc throughput = "
              f"{results['dicomcache']['MB/s'] / results['orthanc']['MB/s']:.2f}")
        return 0
    finally:
        if daemon is not None:
            daemon.stop()
        for proc in procs:
            stop(proc, 20)
        orthanc.stop()
        if not os.environ.get("KEEP_BENCH"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
