"""The forwarder's cost per batch: one association per batch against one kept open.

    python bench/forward_batches.py [--batches 40] [--size 4] [--rows 512] [--runs 3]

``StoreSCU`` (what each forwarder runs) sends ``--batches`` batches of ``--size``
CT instances (``--rows`` square, 16 bit, Explicit VR LE) to a DCMTK ``storescp``
on loopback (writing files), twice per run in alternating order: with
``keep_open`` (``[relay] forward_idle_release`` > 0, the default) and without
(each batch negotiates and releases its own association, as before).  Reports,
medians over the runs, the CPU time of this process (pynetdicom's threads
included) per batch and per instance, the wall time, the associations made, and
the ratio kept / per batch within each run (the machine is shared).  relay/accel/
is installed as the forwarder process installs it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _daemon import stop
from dicomcache.config import DestinationSettings
from dicomcache.devtools.orthanc import free_port
from dicomcache.devtools.samples import make_ct_series, write_series
from dicomcache.relay import accel
from dicomcache.relay.scu import SendItem, StoreSCU
from relay_bench import storescp, wait_files


def batches(root: Path, n: int, size: int, rows: int) -> list[list[SendItem]]:
    out = []
    for b in range(n):
        series = make_ct_series(size, rows=rows, columns=rows, seed=1000 + b)
        files = write_series(series, root / f"b{b}")
        out.append([SendItem(b * size + i, f, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                             str(ds.file_meta.TransferSyntaxUID))
                    for i, (f, ds) in enumerate(zip(files, series, strict=True))])
    return out


def send_all(root: Path, work: list[list[SendItem]], keep: bool) -> dict[str, float]:
    """All batches to a fresh storescp; CPU and wall seconds, associations made."""
    port = free_port()
    pacs = storescp(root, port)
    try:
        dest = DestinationSettings(name="PACS", remote_ae_title="PACS",
                                   remote_host="127.0.0.1", remote_port=port)
        scu = StoreSCU("RELAY", dest, timeout=30.0, keep_open=keep)
        associations = 0
        cpu0, t0 = time.process_time(), time.perf_counter()
        for items in work:
            report = scu.send(items)
            if report.destination_error or len(report.results) != len(items):
                raise RuntimeError(f"batch not delivered: {report}")
            associations += report.associations
        scu.close()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        wait_files(root, sum(map(len, work)), t0)
    finally:
        stop(pacs, 20)
    return {"cpu": cpu, "wall": wall, "associations": associations}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--size", type=int, default=4, help="instances per batch")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    accel.install()
    n_inst = args.batches * args.size
    runs: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="forward-bench-") as tmp:
        root = Path(tmp)
        work = batches(root / "src", args.batches, args.size, args.rows)
        for i in range(max(args.runs, 1)):
            order = (True, False) if i % 2 == 0 else (False, True)
            runs.append({("kept" if keep else "per_batch"):
                         send_all(root / f"run{i}-{keep}", work, keep) for keep in order})

    def med(mode: str, key: str) -> float:
        return statistics.median(r[mode][key] for r in runs)

    print(f"{args.batches} batches x {args.size} CT {args.rows}x{args.rows} to storescp, "
          f"{len(runs)} run(s), medians")
    for mode in ("per_batch", "kept"):
        cpu, wall = med(mode, "cpu"), med(mode, "wall")
        print(f"{mode:10} associations {med(mode, 'associations'):4.0f}  CPU "
              f"{1000 * cpu / args.batches:6.2f} ms/batch {1000 * cpu / n_inst:6.2f} "
              f"ms/instance  wall {n_inst / wall:7.1f} inst/s")
    cpu_ratio = statistics.median(r["kept"]["cpu"] / r["per_batch"]["cpu"] for r in runs)
    wall_ratio = statistics.median(r["per_batch"]["wall"] / r["kept"]["wall"] for r in runs)
    print(f"kept / per batch: CPU {cpu_ratio:.2f}x, rate {wall_ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
