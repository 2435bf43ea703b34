"""Starting the MLflow writer: forked from the logging process (ours) against a fresh interpreter
that imports MLflow and opens the store (the reference: how the writer started before), side by
side.

    python benchmarks/writer_start.py              # 7 interleaved repeats
    python benchmarks/writer_start.py --repeats 3

Every search worker, ``pipeline.train`` and ``pipeline.final`` starts one writer
(``pipeline.tracking.writer.QueuedClient``). Ours: ``QueuedClient(client)`` in this process
(which has imported torch and MLflow and opened the store, as a worker has: a fork copies its
page tables), timed until the child reports ready, then closed; its CPU is the child's
(``RUSAGE_CHILDREN`` once it is reaped). Reference: a ``python -c`` child doing what ``python -m
pipeline.tracking.writer`` did before it answered ready: import ``pipeline.tracking`` (MLflow),
open a spooling client on the store and read one experiment; timed until it exits. Both on the
same SQLite store in a temporary folder; the sides alternate order each repeat; medians.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

REFERENCE = ("from pipeline.tracking import client as t, spool; "
             "c = spool.SpoolingClient(t.tracking_client()); c.search_experiments(max_results=1)")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def ours(client) -> tuple[float, float]:
    from pipeline.tracking.writer import QueuedClient

    cpu0, t0 = children_cpu(), time.perf_counter()
    queued = QueuedClient(client)
    while not queued._ready:
        time.sleep(0.001)
    wall = time.perf_counter() - t0
    queued.close()
    return wall, children_cpu() - cpu0


def reference() -> tuple[float, float]:
    cpu0, t0 = children_cpu(), time.perf_counter()
    subprocess.run([sys.executable, "-c", REFERENCE], check=True)
    return time.perf_counter() - t0, children_cpu() - cpu0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    print(_bench.code_state())
    with _bench.workspace("bench-writer-"), _bench.CpuMeter() as cpu:
        import torch  # noqa: F401 - a worker's heap: torch, MLflow, the store

        from pipeline.tracking import client as tracking

        client = tracking.tracking_client()
        client.search_experiments(max_results=1)
        rows = {"ours": [], "reference": []}
        for r in range(args.repeats + 1):  # the first repeat warms up and is dropped
            sides = [("ours", lambda: ours(client)), ("reference", reference)]
            for name, run in sides if r % 2 else sides[::-1]:
                result = run()
                if r:
                    rows[name].append(result)
    print(f"{args.repeats} repeats, medians; {cpu.describe()}")
    print("| writer start | wall s to ready | CPU s |\n|---|---:|---:|")
    for name, label in (("reference", "fresh interpreter (before)"), ("ours", "fork (now)")):
        walls, cpus = zip(*rows[name], strict=True)
        print(f"| {label} | {statistics.median(walls):.3f} | {statistics.median(cpus):.3f} |")


if __name__ == "__main__":
    main()
