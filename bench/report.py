"""What the run journal and the report cost.

- ``points.log()``: one fsynced journal line; its time per call, against a plain
  ``f.write`` + ``flush`` + ``os.fsync`` of the same line measured here (the baseline:
  what any logger that survives a crash pays).
- ``save()``: a synchronous save of a small model (where the journal's save and storage
  lines are on the caller's time; asynchronous saves write them in the background),
  against the same saves with the journal's writes turned off.
- ``savepoints report``: time and size of the page for runs that logged 10, 1,000 and
  10,000 steps (loss and learning rate every step, a save point every tenth of the run).

    python bench/report.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from savepoints import Keep, SavePoints
from savepoints.journal import Journal
from savepoints.report import write_report


def per_call(fn, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return times


def row(name: str, times: list[float], base: float | None = None) -> str:
    med = statistics.median(times)
    ratio = f"  {med / base:5.2f}x baseline" if base else ""
    return (f"{name:<34} min {min(times) * 1e3:7.3f} ms  median {med * 1e3:7.3f} ms  "
            f"max {max(times) * 1e3:7.3f} ms{ratio}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        line = json.dumps({"time": 0.0, "event": "log", "step": 1, "values": {"loss": 0.5}})
        with open(root / "plain.jsonl", "a") as f:

            def plain(i: int) -> None:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())

            base = per_call(plain, args.repeats)
        with SavePoints(root / "logged") as points:
            logged = per_call(lambda i: points.log(i, loss=0.5, learning_rate=1e-3), args.repeats)
        print(row("fsynced line, plain file (baseline)", base))
        print(row("points.log()", logged, statistics.median(base)))

        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 4))

        def saves(run: Path) -> list[float]:
            with SavePoints(run, async_save=False) as points:
                return per_call(lambda i: points.save(i, model=model), 30)

        # The baseline: the same synchronous saves with the journal's writes turned off.
        record = Journal.record
        Journal.record = lambda *args, **kw: None  # type: ignore[method-assign]
        try:
            quiet = saves(root / "saves-without")
        finally:
            Journal.record = record  # type: ignore[method-assign]
        print(row("sync save(), no journal (baseline)", quiet))
        print(row("sync save(), journal on", saves(root / "saves"), statistics.median(quiet)))

        for steps in (10, 1_000, 10_000):
            run = root / f"run-{steps}"
            with SavePoints(run, keep=Keep(last=3)) as points:
                for step in range(1, steps + 1):
                    points.log(step, loss=1 / step**0.5, learning_rate=1e-3 * (1 - step / steps))
                    if step % max(1, steps // 10) == 0:
                        points.save(step, model=model)
            t = time.perf_counter()
            out = write_report(run)
            took = time.perf_counter() - t
            print(f"report of {steps:>6} logged steps: {took:6.2f} s, "
                  f"{out.stat().st_size / 1000:6.1f} KB")  # fmt: skip


if __name__ == "__main__":
    main()
