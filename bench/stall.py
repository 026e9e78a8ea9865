"""Training stall per save point, and restore time, against Hugging Face Trainer.

GPT-2 (124M, built from its config) with AdamW after one step: 1.49 GB of state. Each
variant runs --repeats times, interleaved, and prints min/median/max seconds:

  stall  hf-trainer   save_pretrained + torch.save(optimizer/scheduler/RNG), as
                      Trainer._save_checkpoint does (training waits for all of it)
         sync         SavePoints.save(): hashed, fsynced, committed before it returns
         async        SavePoints(async_save=True).save(): returns after the snapshot into
                      reused host buffers; the rest is written in the background
  load   hf           AutoModelForCausalLM.from_pretrained on an HF-saved folder
         savepoints   the same on a save point folder
  resume hf           Trainer-style resume loading: weights into the model, torch.load of
                      optimizer, scheduler and RNG
         savepoints   SavePoints.restore(model, optimizer, scheduler, rng), verify=False
                      (hashing every byte first is a separate, optional cost)

It also reports the extra memory an async save holds (its host buffers) as a multiple of
the state's size.

    python bench/stall.py              # 5 repeats
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from save_overhead import build, hf_style

from savepoints import Keep, SavePoints


def timed(fn) -> float:
    """Seconds ``fn`` takes, starting with no dirty pages (each variant pays for its own
    writes, not for what the previous one left in the page cache)."""
    gc.collect()
    os.sync()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def hf_resume(folder: Path, model, optimizer, scheduler) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    from savepoints.hf_import import _weights_only_load  # as Trainer loads: weights only

    optimizer.load_state_dict(_weights_only_load(folder / "optimizer.pt"))
    scheduler.load_state_dict(_weights_only_load(folder / "scheduler.pt"))
    rng = _weights_only_load(folder / "rng_state.pth")
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["cpu"])


def row(name: str, ts: list[float], base: float | None = None) -> str:
    med = statistics.median(ts)
    ratio = f"{med / base:7.3f}x" if base else ""
    return f"  {name:14} {min(ts):8.3f} {med:9.3f} {max(ts):8.3f}  {ratio}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, optimizer, scheduler = build(args.layers)
    # each storage once: GPT-2's lm_head is the embedding matrix (tied), stored once
    unique = {t.data_ptr(): t for t in model.state_dict().values()}
    state_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    state_bytes += sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )  # fmt: skip
    base = Path(tempfile.mkdtemp(prefix="sp-stall-", dir=args.dir))
    stall: dict[str, list[float]] = {"hf-trainer": [], "sync": [], "async": []}
    background: list[float] = []
    try:
        sync_points = SavePoints(base / "sync", keep=Keep(last=1), async_save=False)
        async_points = SavePoints(base / "async", keep=Keep(last=1), async_save=True)
        first_async = timed(lambda: async_points.save(0, model=model, optimizer=optimizer,
                                                      scheduler=scheduler))  # fmt: skip
        async_points.wait()  # the first save allocates the buffers; later ones reuse them
        for i in range(1, args.repeats + 1):
            folder = base / f"hf-{i}"
            stall["hf-trainer"].append(
                timed(lambda: hf_style(folder, model, optimizer, scheduler))  # noqa: B023
            )
            if i > 1:
                shutil.rmtree(base / f"hf-{i - 1}")
            stall["sync"].append(timed(lambda: sync_points.save(
                i, model=model, optimizer=optimizer, scheduler=scheduler)))  # fmt: skip  # noqa: B023
            stall["async"].append(timed(lambda: async_points.save(
                i, model=model, optimizer=optimizer, scheduler=scheduler)))  # fmt: skip  # noqa: B023
            background.append(timed(async_points.wait))
        buffers = async_points._writer._snapshots.buffers.nbytes
        sp_folder = sync_points.latest().path
        hf_folder = base / f"hf-{args.repeats}"
        load: dict[str, list[float]] = {"hf": [], "savepoints": []}
        resume: dict[str, list[float]] = {"hf": [], "savepoints": []}
        for _ in range(args.repeats):
            load["hf"].append(timed(lambda: AutoModelForCausalLM.from_pretrained(hf_folder)))
            load["savepoints"].append(
                timed(lambda: AutoModelForCausalLM.from_pretrained(sp_folder))
            )
            resume["hf"].append(timed(lambda: hf_resume(hf_folder, model, optimizer, scheduler)))
            resume["savepoints"].append(timed(lambda: sync_points.restore(
                model=model, optimizer=optimizer, scheduler=scheduler, verify=False)))  # fmt: skip
        sync_points.close()
        async_points.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)

    params = sum(p.numel() for p in model.parameters())
    print(
        f"GPT-2 {args.layers} layers ({params / 1e6:.0f}M parameters) + AdamW: "
        f"{state_bytes / 1e9:.2f} GB of state; {args.repeats} runs each\n"
    )
    print(f"  {'':14} {'min s':>8} {'median s':>9} {'max s':>8}  vs HF")
    print("training stall per save point")
    hf = statistics.median(stall["hf-trainer"])
    for name, ts in stall.items():
        print(row(name, ts, hf))
    print(
        f"  (async: first save, allocating its buffers, {first_async:.3f} s; background "
        f"write per save, median {statistics.median(background):.3f} s)"
    )
    print("from_pretrained")
    for name, ts in load.items():
        print(row(name, ts, statistics.median(load["hf"])))
    print("full resume loading (model, optimizer, scheduler, RNG)")
    for name, ts in resume.items():
        print(row(name, ts, statistics.median(resume["hf"])))
    print(
        f"\nasync save extra memory: host buffers {buffers / 1e9:.2f} GB = "
        f"{buffers / state_bytes:.3f}x the state"
    )


if __name__ == "__main__":
    main()
