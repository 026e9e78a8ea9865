"""Durable save throughput against dd with fdatasync on the same disk.

Each run writes the same number of bytes both ways and prints MB/s (min/median/max) and
the ratio of medians:

  dd          dd if=/dev/zero of=F bs=64M count=N conv=fdatasync
  savepoints  SavePoints.save(model, optimizer) of GPT-2 124M + AdamW (1.49 GB): hashed,
              every file fsynced, manifest written last, renamed into place

    python bench/throughput.py       # 5 runs in a temp dir on /tmp (--dir picks the disk)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from save_overhead import build

from savepoints import Keep, SavePoints


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    model, optimizer, _ = build(args.layers)
    base = Path(tempfile.mkdtemp(prefix="sp-tput-", dir=args.dir))
    rates: dict[str, list[float]] = {"dd": [], "savepoints": []}
    try:
        # dedup off: every run must really write its bytes, as dd does
        points = SavePoints(base / "run", keep=Keep(last=1), dedup=False, async_save=False)
        size = 0
        for i in range(1, args.repeats + 1):
            t0 = time.perf_counter()
            sp = points.save(i, model=model, optimizer=optimizer, rng=False)
            rates["savepoints"].append(sp.size / (time.perf_counter() - t0) / 1e6)
            size = sp.size
            count = max(1, round(size / (64 * 1024 * 1024)))
            t0 = time.perf_counter()
            dd = ["dd", "if=/dev/zero", f"of={base / 'dd.bin'}", "bs=64M", f"count={count}",
                  "conv=fdatasync"]  # fmt: skip
            subprocess.run(dd, check=True, capture_output=True)
            rates["dd"].append(count * 64 * 1024 * 1024 / (time.perf_counter() - t0) / 1e6)
            (base / "dd.bin").unlink()
        points.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{size / 1e9:.2f} GB per write, {args.repeats} runs each (MB/s)\n")
    for name, rs in rates.items():
        med = statistics.median(rs)
        print(f"  {name:12} min {min(rs):7.0f}  median {med:7.0f}  max {max(rs):7.0f}")
    ratio = statistics.median(rates["savepoints"]) / statistics.median(rates["dd"])
    print(f"\nsavepoints / dd (medians): {ratio:.2f}x")


if __name__ == "__main__":
    main()
