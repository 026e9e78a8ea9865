"""What hashing costs a save, and how a save compares to Hugging Face's own checkpoint.

For GPT-2 (124M parameters by default, built from its config: no download) with AdamW
state, it times over --repeats runs each:

  savepoints        SavePoints.save(model, optimizer, scheduler, rng): hashed, fsynced
  savepoints-nohash the same with hashing switched off (the baseline for hash overhead)
  hf-trainer-style  model.save_pretrained + torch.save(optimizer/scheduler state) and the
                    RNG pickle, as Trainer._save_checkpoint writes them (no fsync there)

and prints min/median/max plus ratios against the baselines measured in the same run.

    python bench/save_overhead.py              # GPT-2 124M, 5 repeats
    python bench/save_overhead.py --layers 2   # quick
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import savepoints.integrity
import savepoints.staging
from savepoints import SavePoints


def build(layers: int):
    from transformers import GPT2Config, GPT2LMHeadModel, get_linear_schedule_with_warmup

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = get_linear_schedule_with_warmup(optimizer, 10, 1000)
    ids = torch.randint(0, 50257, (1, 16))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return model, optimizer, scheduler


def hf_style(folder: Path, model, optimizer, scheduler) -> None:
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.get_rng_state(),
    }
    torch.save(rng, folder / "rng_state.pth")


class NoHash(savepoints.integrity.StreamHasher):
    def update(self, data) -> None:
        self.size += len(data)


def du(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir on /tmp)")
    args = ap.parse_args()

    model, optimizer, scheduler = build(args.layers)
    base = Path(tempfile.mkdtemp(prefix="sp-bench-", dir=args.dir))
    times: dict[str, list[float]] = {
        "savepoints": [],
        "savepoints-nohash": [],
        "hf-trainer-style": [],
    }
    sizes: dict[str, int] = {}
    try:
        for i in range(args.repeats):
            for name in times:
                target = base / f"{name}-{i}"
                os.sync()
                t0 = time.perf_counter()
                if name == "hf-trainer-style":
                    hf_style(target, model, optimizer, scheduler)
                else:
                    if name == "savepoints-nohash":
                        savepoints.staging.StreamHasher = NoHash  # type: ignore[misc]
                    try:
                        with SavePoints(target, async_save=False) as points:
                            points.save(1, model=model, optimizer=optimizer, scheduler=scheduler)
                    finally:
                        savepoints.staging.StreamHasher = savepoints.integrity.StreamHasher  # type: ignore[misc]
                times[name].append(time.perf_counter() - t0)
                sizes[name] = du(target)
                shutil.rmtree(target)
        # hashing alone, in memory, over the same bytes
        data = os.urandom(256 * 1024 * 1024)
        h = savepoints.integrity.StreamHasher()
        t0 = time.perf_counter()
        h.update(data)
        hash_gbps = len(data) / (time.perf_counter() - t0) / 1e9
    finally:
        shutil.rmtree(base, ignore_errors=True)

    params = sum(p.numel() for p in model.parameters())
    print(
        f"GPT-2 with {args.layers} layers ({params / 1e6:.0f}M parameters) + AdamW, "
        f"{args.repeats} runs each, on {os.cpu_count()} CPU cores\n"
    )
    print(f"{'variant':20} {'bytes':>10} {'min s':>8} {'median s':>9} {'max s':>8} {'MB/s':>7}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:20} {sizes[name] / 1e6:9.0f}M {min(ts):8.2f} {med:9.2f} {max(ts):8.2f} "
            f"{sizes[name] / med / 1e6:7.0f}"
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = med["savepoints"] / med["savepoints-nohash"]
    print(f"\nhash overhead: savepoints / savepoints-nohash = {overhead:.2f}x")
    print(
        f"savepoints (durable, hashed) / hf-trainer-style (not fsynced) = "
        f"{med['savepoints'] / med['hf-trainer-style']:.2f}x"
    )
    print(f"BLAKE3 in memory: {hash_gbps:.1f} GB/s")


if __name__ == "__main__":
    main()
