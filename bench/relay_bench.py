"""Relay benchmark: storescu → dicomcache relay → storescp, against storescu → storescp.

    python bench/relay_bench.py [--count 200] [--runs N] [--json] [--baseline DIR]
                                [--profile FILE] [--accelerate on|off|both]
                                [--parallel N[,N…]] [--scp-alone]

200 generated CT instances of 512 KiB (512x512x16 bit, Explicit VR LE).  All
processes on 127.0.0.1, DCMTK with TCP_NODELAY=1 (``loopback_env``), the
relay as its own process (``python -m dicomcache relay run``), spool and
PACS folders in a temp dir.  Reports:

* direct: storescu → storescp, instances/s and MB/s until the last file is
  on the peer's disk (storescp writes before it answers);
* relay: time until the modality has all its acknowledgements (ack rate)
  and until the last instance is on the peer's disk (end to end), and the
  CPU time of the relay's process and of its forwarder process per instance (of
  every relayed run: this checkout, ``--baseline``, ``--parallel``);
* the same with ``--parallel`` associations at once (default 4 storescu,
  each its own calling AE title: several modalities);
* with ``--scp-alone``, the relay again with no destination (no forwarder, no
  PACS): its acknowledgement rate in the same run, to tell what forwarding
  costs the SCP from what the machine's load does;
* transcoding rates in-process: Explicit → Implicit VR LE, JPEG Lossless →
  Implicit VR LE.

``--runs N`` repeats direct, relay (and baseline) N times and reports medians,
each ratio taken within its own run (the machine is shared: single runs vary).
``--accelerate`` sets the relay's ``[relay] accelerate`` (relay/accel/ on, the
default, or off); ``both`` runs the relay twice per run, with and without, and
reports the plain relay as ``plain``.
``--baseline DIR`` runs the relay a second time from another checkout (e.g.
``git archive HEAD dicomcache | tar -x -C DIR``) in the same run: before/after
ratios on a shared machine (a checkout older than ``relay run`` is started
with its ``python -m dicomcache.relay.service``).  ``--profile FILE`` records
the relay with py-spy (raw, ``--threads``) into FILE and its forwarder process
into FILE.forwarder.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _daemon import stop
from dicomcache.devtools.orthanc import free_port, loopback_env
from dicomcache.devtools.samples import make_ct_series, write_series
from dicomcache.dicom import syntaxes
from dicomcache.relay.transcode import shutdown_pool, transcode_bytes


def _py_spy() -> str:
    import shutil

    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else (shutil.which("py-spy") or "py-spy")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def wait_port(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"port {port} not listening")


def storescp(directory: Path, port: int) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["storescp", "-aet", "PACS", "+xa", "-od", str(directory), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=loopback_env(), start_new_session=True)
    wait_port(port)
    return proc


def storescu(files: list[Path], port: int, aec: str, associations: int = 1) -> float:
    """Send ``files`` with ``associations`` storescu processes at once (each its own
    calling AE title, as several modalities), files dealt round-robin; seconds until
    the last one has all its acknowledgements."""
    started = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", f"MODALITY{i}", "-aec", aec, "-xe",
                               "127.0.0.1", str(port), *map(str, files[i::associations])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=loopback_env())
             for i in range(associations)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-2000:]}")
    return time.perf_counter() - started


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_files(directory: Path, count: int, started: float, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for _ in directory.iterdir()) >= count:
            return time.perf_counter() - started
        time.sleep(0.005)
    raise TimeoutError(f"only {sum(1 for _ in directory.iterdir())}/{count} files arrived")


def transcode_rate(blobs: list[bytes], target: str) -> tuple[float, float]:
    started = time.perf_counter()
    for blob in blobs:
        transcode_bytes(blob, target)
    secs = time.perf_counter() - started
    return len(blobs) / secs, sum(map(len, blobs)) / secs / 1e6


def relay_command(code: Path) -> list[str]:
    """How the checkout at ``code`` runs the relay alone."""
    cli = code / "dicomcache" / "cli" / "relay.py"
    if cli.exists() and '"run"' in cli.read_text():
        return [sys.executable, "-m", "dicomcache", "relay", "run"]
    return [sys.executable, "-m", "dicomcache.relay.service"]  # before `relay run`


def relay_run(root: Path, files: list[Path], n: int, code: Path, *,
              profile: str | None = None, extra: tuple[str, ...] = (),
              accelerate: bool = True, associations: int = 1,
              cpu: dict[str, float] | None = None,
              destination: bool = True) -> tuple[float, float]:
    """storescu (``associations`` at once) → relay (``dicomcache relay run`` from
    ``code``) → storescp; returns (seconds until every acknowledgement, seconds until
    the last instance is on the PACS's disk).  ``cpu`` gets the CPU seconds the relay's
    process (``scp``) and its forwarder process (``forwarder``) spent meanwhile.
    ``destination=False``: the relay has none (the SCP alone); both times are then the
    acknowledgements'."""
    root.mkdir(parents=True)
    pacs_port, relay_port = free_port(), free_port()
    pacs = storescp(root / "via", pacs_port)
    config = root / "relay.toml"
    config.write_text(
        '[server]\nlog_level = "WARNING"\n'
        # The audit trail in the work directory (a --baseline checkout may predate it).
        + (f'[audit]\nfile = "{root / "audit.jsonl"}"\n'
           if (code / "dicomcache" / "audit").is_dir() else "")
        + f'[relay]\nenabled = true\nport = {relay_port}\n'
        f'spool_directory = "{root / "spool"}"\n'
        # (the key only when off: a --baseline checkout may predate it)
        + ("" if accelerate else "accelerate = false\n")
        + (f'[[relay.destinations]]\nname = "PACS"\nremote_ae_title = "PACS"\n'
           f'remote_host = "127.0.0.1"\nremote_port = {pacs_port}\n' if destination else ""))
    env = dict(os.environ, PYTHONPATH=str(code))
    relay = subprocess.Popen([*relay_command(code), "--config", str(config), *extra],
                             cwd=code, env=env,
                             stdout=subprocess.DEVNULL, stderr=(root / "relay.log").open("wb"),
                             start_new_session=True)
    try:
        wait_port(relay_port)
        spies = []
        if profile:
            # The relay (FILE) and its forwarder process (FILE.forwarder): one py-spy each
            # (--subprocesses does not pick up a child that already runs).
            targets = [(relay.pid, profile)] + [(pid, f"{profile}.forwarder")
                                                for pid in _children(relay.pid)]
            spies = [subprocess.Popen([_py_spy(), "record", "-f", "raw", "--threads",
                                       "--nonblocking", "-r", "250", "-o", out,
                                       "--pid", str(pid)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for pid, out in targets]
            time.sleep(1.0)
        procs = {"scp": relay.pid}
        procs.update(("forwarder", pid) for pid in _children(relay.pid))
        before = {k: cpu_seconds(pid) for k, pid in procs.items()}
        t0 = time.perf_counter()
        acks = storescu(files, relay_port, "DICOMCACHE", associations)
        e2e = wait_files(root / "via", n, t0) if destination else acks
        if cpu is not None:
            cpu.update({k: cpu_seconds(pid) - before[k] for k, pid in procs.items()})
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
    finally:
        stop(relay, 20)
        stop(pacs, 20)
    return acks, e2e


def one_run(root: Path, files: list[Path], n: int, baseline: str | None,
            profile: str | None, accelerate: str = "on",
            parallel: tuple[int, ...] = (), scp_alone: bool = False) -> dict[str, float]:
    """direct, relay (plain, baseline, SCP alone, then ``parallel`` associations) once
    each, in that order: seconds (``cpu_*``: CPU seconds of the relay's processes)."""
    out: dict[str, float] = {}
    port = free_port()
    pacs = storescp(root / "direct", port)
    try:
        t0 = time.perf_counter()
        storescu(files, port, "PACS")
        out["direct"] = wait_files(root / "direct", n, t0)
    finally:
        stop(pacs, 20)
    here = Path(__file__).resolve().parents[1]
    cpu: dict[str, float] = {}
    out["acks"], out["e2e"] = relay_run(root / "relay", files, n, here, profile=profile,
                                        accelerate=accelerate != "off", cpu=cpu)
    out.update({f"cpu_{k}": v for k, v in cpu.items()})
    if accelerate == "both":
        out["p_acks"], out["p_e2e"] = relay_run(root / "plain", files, n, here,
                                                accelerate=False)
    if baseline:
        b_cpu: dict[str, float] = {}
        out["b_acks"], out["b_e2e"] = relay_run(root / "baseline", files, n,
                                                Path(baseline).resolve(), cpu=b_cpu)
        out.update({f"cpu_baseline_{k}": v for k, v in b_cpu.items()})
    if scp_alone:
        alone: dict[str, float] = {}
        out["alone_acks"], _ = relay_run(root / "alone", files, n, here,
                                         accelerate=accelerate != "off", cpu=alone,
                                         destination=False)
        out["cpu_alone_scp"] = alone["scp"]
    for k in parallel:
        out[f"acks_x{k}"], out[f"e2e_x{k}"] = relay_run(
            root / f"relay_x{k}", files, n, here, accelerate=accelerate != "off",
            associations=k, cpu=cpu)
        out.update({f"cpu_x{k}_{name}": v for name, v in cpu.items()})
        if baseline:
            out[f"b_acks_x{k}"], out[f"b_e2e_x{k}"] = relay_run(
                root / f"baseline_x{k}", files, n, Path(baseline).resolve(), associations=k,
                cpu=cpu)
            out.update({f"cpu_baseline_x{k}_{name}": v for name, v in cpu.items()})
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat direct/relay(/baseline) this many times; medians are "
                             "reported, each ratio taken within its own run")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", metavar="FILE", default=None,
                        help="py-spy (raw, --threads) of the relay during the relayed run, "
                             "written to FILE (its forwarder process: FILE.forwarder)")
    parser.add_argument("--baseline", metavar="DIR", default=None,
                        help="also run the relay from another checkout (e.g. a `git worktree` "
                             "of the previous commit) in the same run, for before/after ratios")
    parser.add_argument("--accelerate", choices=("on", "off", "both"), default="on",
                        help="[relay] accelerate of the relay under test; both: run it with "
                             "and without in each run (the plain one reported as 'plain')")
    parser.add_argument("--parallel", metavar="N[,N…]", default="4",
                        help="also run the relay with N storescu associations at once (each "
                             "its own calling AE title), in each run; '' for none")
    parser.add_argument("--scp-alone", action="store_true",
                        help="also run the relay with no destination in each run (the SCP "
                             "alone: no forwarder, no PACS)")
    args = parser.parse_args()
    parallel = tuple(int(k) for k in args.parallel.split(",") if k.strip())
    n = args.count
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        root = Path(tmp)
        series = make_ct_series(n, rows=512, columns=512, seed=42)
        files = write_series(series, root / "modality")
        total = sum(f.stat().st_size for f in files)
        mb = total / 1e6
        runs = [one_run(root / f"run{i}", files, n, args.baseline,
                        args.profile if i == 0 else None, args.accelerate, parallel,
                        args.scp_alone)
                for i in range(max(args.runs, 1))]

        # Transcoding (in this process).
        blobs = [f.read_bytes() for f in files[: min(n, 100)]]
        exp_rate = transcode_rate(blobs, syntaxes.IMPLICIT_LE)
        jll = [transcode_bytes(b, syntaxes.JPEG_LOSSLESS_SV1) for b in blobs[:50]]
        jll_rate = transcode_rate(jll, syntaxes.IMPLICIT_LE)
        shutdown_pool()

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    def ratio(key: str) -> float:  # direct rate / relay rate, within each run
        return round(statistics.median(r["direct"] / r[key] for r in runs), 2)

    direct, acks, e2e = med("direct"), med("acks"), med("e2e")
    both = args.accelerate == "both"
    result = {
        "instances": n, "instance_bytes": total // n, "total_mb": round(mb, 1),
        "runs": len(runs),
        "direct": {"seconds": round(direct, 3), "instances_per_s": round(n / direct, 1),
                   "mb_per_s": round(mb / direct, 1)},
        "relay_acks": {"seconds": round(acks, 3), "instances_per_s": round(n / acks, 1),
                       "mb_per_s": round(mb / acks, 1)},
        "relay_end_to_end": {"seconds": round(e2e, 3), "instances_per_s": round(n / e2e, 1),
                             "mb_per_s": round(mb / e2e, 1), "ratio_to_direct": ratio("e2e")},
        "per_run": [{k: round(n / v, 1) for k, v in r.items() if not k.startswith("cpu_")}
                    for r in runs],
        # CPU milliseconds per instance of the relay's processes (scp, forwarder), of the
        # relay under test with one association, then baseline_…, x{k}_…, baseline_x{k}_…
        "cpu_ms_per_instance": {k[4:]: round(1000 * med(k) / n, 2) for k in runs[0]
                                if k.startswith("cpu_")},
        "parallel": {str(k): {"acks_instances_per_s": round(n / med(f"acks_x{k}"), 1),
                              "end_to_end_instances_per_s": round(n / med(f"e2e_x{k}"), 1),
                              "ratio_to_direct": ratio(f"e2e_x{k}")} for k in parallel},
        "scp_alone_acks_instances_per_s": round(n / med("alone_acks"), 1)
        if args.scp_alone else None,
        "accelerate": args.accelerate,
        "plain_acks_instances_per_s": round(n / med("p_acks"), 1) if both else None,
        "plain_end_to_end": {"instances_per_s": round(n / med("p_e2e"), 1),
                             "ratio_to_direct": ratio("p_e2e")} if both else None,
        "baseline_acks_instances_per_s": round(n / med("b_acks"), 1) if args.baseline
        else None,
        "baseline_end_to_end": {"instances_per_s": round(n / med("b_e2e"), 1),
                                "ratio_to_direct": ratio("b_e2e")} if args.baseline else None,
        "transcode_explicit_to_implicit": {"instances_per_s": round(exp_rate[0], 1),
                                           "mb_per_s": round(exp_rate[1], 1)},
        "transcode_jpeg_lossless_to_implicit": {"instances_per_s": round(jll_rate[0], 1),
                                                "mb_per_s_compressed_in": round(jll_rate[1], 1)},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{n} instances x {total // n // 1024} KiB ({mb:.0f} MB), loopback, TCP_NODELAY=1, "
          f"{len(runs)} run(s), medians")
    if len(runs) > 1:
        for i, r in enumerate(result["per_run"]):
            extra = (f"  plain acks {r['p_acks']:6.1f}  e2e {r['p_e2e']:6.1f}"
                     if both else "")
            extra += (f"  baseline acks {r['b_acks']:6.1f}  e2e {r['b_e2e']:6.1f}"
                      if args.baseline else "")
            extra += f"  alone acks {r['alone_acks']:6.1f}" if args.scp_alone else ""
            extra += "".join(f"  x{k} acks {r[f'acks_x{k}']:6.1f}  e2e {r[f'e2e_x{k}']:6.1f}"
                             for k in parallel)
            print(f"  run {i}: direct {r['direct']:6.1f}  acks {r['acks']:6.1f}  "
                  f"e2e {r['e2e']:6.1f} inst/s{extra}")
    print(f"direct storescu→storescp      {n / direct:7.1f} inst/s {mb / direct:7.1f} MB/s")
    label = "relay" if args.accelerate != "off" else "plain relay"
    print(f"{label + ': modality acks':30}{n / acks:7.1f} inst/s {mb / acks:7.1f} MB/s")
    print(f"{label + ': end to end':30}{n / e2e:7.1f} inst/s {mb / e2e:7.1f} MB/s "
          f"({ratio('e2e'):.2f}x direct)")
    for name, ms in result["cpu_ms_per_instance"].items():
        print(f"{label + ': CPU of ' + name:30}{ms:7.2f} ms/instance")
    if args.scp_alone:
        a_acks = med("alone_acks")
        print(f"{label + ', no destination: acks':30}{n / a_acks:7.1f} inst/s "
              f"{mb / a_acks:7.1f} MB/s")
    for k in parallel:
        k_acks, k_e2e = med(f"acks_x{k}"), med(f"e2e_x{k}")
        print(f"{f'{label}, {k} associations: acks':30}{n / k_acks:7.1f} inst/s "
              f"{mb / k_acks:7.1f} MB/s")
        print(f"{f'{label}, {k} associations: e2e':30}{n / k_e2e:7.1f} inst/s "
              f"{mb / k_e2e:7.1f} MB/s ({ratio(f'e2e_x{k}'):.2f}x direct)")
    if both:
        p_acks, p_e2e = med("p_acks"), med("p_e2e")
        print(f"plain relay: modality acks    {n / p_acks:7.1f} inst/s {mb / p_acks:7.1f} MB/s")
        print(f"plain relay: end to end       {n / p_e2e:7.1f} inst/s {mb / p_e2e:7.1f} MB/s "
              f"({ratio('p_e2e'):.2f}x direct)")
    if args.baseline:
        b_acks, b_e2e = med("b_acks"), med("b_e2e")
        print(f"baseline: modality acks       {n / b_acks:7.1f} inst/s {mb / b_acks:7.1f} MB/s")
        print(f"baseline: end to end          {n / b_e2e:7.1f} inst/s {mb / b_e2e:7.1f} MB/s "
              f"({ratio('b_e2e'):.2f}x direct)")
        for k in parallel:
            k_acks, k_e2e = med(f"b_acks_x{k}"), med(f"b_e2e_x{k}")
            print(f"{f'baseline, {k} associations: acks':30}{n / k_acks:7.1f} inst/s")
            print(f"{f'baseline, {k} associations: e2e':30}{n / k_e2e:7.1f} inst/s "
                  f"({ratio(f'b_e2e_x{k}'):.2f}x direct)")
    print(f"transcode Explicit→Implicit   {exp_rate[0]:7.1f} inst/s {exp_rate[1]:7.1f} MB/s")
    print(f"transcode JPEG-LL→Implicit    {jll_rate[0]:7.1f} inst/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
