"""Multi-rank save and restore: savepoints against torch DCP, same state, same run.

    python bench/ranks.py [--kind fsdp|ddp] [--ranks 1 2] [--repeats 3] [--layers 12]

Starts the ranks itself (gloo on 127.0.0.1, as torchrun would). Each rank builds a
GPT-2 language model (124M parameters with the defaults) sharded with FSDP2
(``fully_shard``) or wrapped in DDP, takes one AdamW step so the optimizer has state,
then, alternating and ``--repeats`` times each:

* **DCP**: ``torch.distributed.checkpoint.save({"model", "optim"})`` of the state from
  ``get_state_dict``, and ``load`` + ``set_state_dict`` back (DCP's own format: local
  shards, a pickled ``.metadata``);
* **savepoints**: ``SavePoints.save(step, model=, optimizer=)`` (whole tensors in the
  standard Transformers layout, hashed and committed) and ``restore(model=,
  optimizer=)`` (verified first, as by default).

It reports the median wall time of each (the slowest rank's) and the peak memory each
rank added above what it held before the call (RSS sampled every 2 ms), next to the
size of the model and of the whole state. Ratios are savepoints / DCP.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Peak:
    """Peak RSS above the level at entry, sampled in a thread."""

    def __enter__(self) -> Peak:
        self.base = rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def added(self) -> int:
        return self.peak - self.base


def rank_main(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )
    from transformers import GPT2Config, GPT2LMHeadModel

    from savepoints import SavePoints

    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=args.layers))
    wrapped: Any = model
    if args.kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
    ids = torch.randint(0, 50257, (1, 32))
    wrapped(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    root = Path(args.dir)
    options = StateDictOptions(full_state_dict=False)
    names = ("dcp_save", "dcp_load", "sp_save", "sp_load")
    results: dict[str, list[tuple[float, int]]] = {k: [] for k in names}

    def timed(name: str, fn: Any) -> None:
        dist.barrier()
        with Peak() as peak:
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
        dist.barrier()
        results[name].append((seconds, peak.added))

    points = SavePoints(root / "sp", timeout=600)
    for i in range(args.repeats):
        where = root / f"dcp-{i}"

        def dcp_save(where: Path = where) -> None:
            msd, osd = get_state_dict(model, optimizer, options=options)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(where))

        def dcp_load(where: Path = where) -> None:
            msd, osd = get_state_dict(model, optimizer, options=options)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=str(where))
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])  # fmt: skip

        timed("dcp_save", dcp_save)
        timed("sp_save", lambda i=i: points.save(i + 1, model=model, optimizer=optimizer,
                                                 rng=False))  # fmt: skip
        timed("dcp_load", dcp_load)
        timed("sp_load", lambda i=i: points.restore(i + 1, model=model, optimizer=optimizer,
                                                    rng=False))  # fmt: skip
    points.close()
    state_bytes = sum(e.size for e in points.get(1).manifest.files.values())
    out = {"rank": rank, "world": world, "params_bytes": params, "state_bytes": state_bytes,
           "results": results}  # fmt: skip
    Path(f"{args.out}.rank-{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def launch(world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix=f"bench-ranks-{world}-", dir=args.tmp))
    out = work / "result"
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}  # fmt: skip
        cmd = [sys.executable, __file__, "--rank-main", "--dir", str(work), "--out", str(out),
               "--kind", args.kind, "--repeats", str(args.repeats),
               "--layers", str(args.layers)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env))
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a rank failed (exit {p.returncode})")
    found = [json.loads(Path(f"{out}.rank-{r}.json").read_text()) for r in range(world)]
    shutil.rmtree(work, ignore_errors=True)
    return found


def summarize(world: int, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"ranks": world, "state_mb": ranks[0]["state_bytes"] / 1e6,
                           "model_mb": ranks[0]["params_bytes"] / 1e6}  # fmt: skip
    for name in ("dcp_save", "sp_save", "dcp_load", "sp_load"):
        repeats = len(ranks[0]["results"][name])
        slowest = [max(r["results"][name][i][0] for r in ranks) for i in range(repeats)]
        row[f"{name}_s"] = statistics.median(slowest)
        # The first call of each pays one-time costs (imports, thread pools): the
        # memory reported is the median over repeats of the largest rank's.
        mems = [max(r["results"][name][i][1] for r in ranks) for i in range(repeats)]
        row[f"{name}_mem_mb"] = statistics.median(mems) / 1e6
        row[f"{name}_mem_first_mb"] = mems[0] / 1e6
    row["save_ratio"] = row["sp_save_s"] / row["dcp_save_s"]
    row["load_ratio"] = row["sp_load_s"] / row["dcp_load_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=("fsdp", "ddp"), default="fsdp")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--tmp", default=None, help="where to write (default: the temp dir)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        rank_main(args)
        return
    rows = [summarize(world, launch(world, args)) for world in args.ranks]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{args.kind}, GPT-2 {args.layers} layers: model {rows[0]['model_mb']:.0f} MB, "
          f"save point {rows[0]['state_mb']:.0f} MB (weights + AdamW); median of "
          f"{args.repeats}, slowest rank; memory = peak added per rank")  # fmt: skip
    print("| ranks | DCP save | savepoints save | ratio | DCP load | savepoints restore | ratio "
          "| peak mem save DCP / sp | peak mem load DCP / sp |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['ranks']} | {r['dcp_save_s']:.2f} s | {r['sp_save_s']:.2f} s | "
              f"{r['save_ratio']:.2f}x | {r['dcp_load_s']:.2f} s | {r['sp_load_s']:.2f} s | "
              f"{r['load_ratio']:.2f}x | {r['dcp_save_mem_mb']:.0f} / {r['sp_save_mem_mb']:.0f} MB"
              f" | {r['dcp_load_mem_mb']:.0f} / {r['sp_load_mem_mb']:.0f} MB |")  # fmt: skip


if __name__ == "__main__":
    main()
