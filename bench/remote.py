"""Pushing save points to object storage: savepoints against a plain client put.

    python bench/remote.py [--target s3|file|both] [--layers 6] [--repeats 3]

Builds a GPT-2 sequence classifier (``--layers`` blocks, fp32; one weights shard per
layer, as savepoints writes models above 64 MB) and saves it once. Then, alternating and
``--repeats`` times each, into a fresh prefix every time:

* **plain put**: obstore's ``put`` of every file of the save point folder, 8 at a time
  (the same client, the same concurrency, no checks): the floor;
* **savepoints push**: ``RemoteRun.push`` of the same folder (read the remote manifest,
  LIST the blobs, upload them, write the manifest create-only, LIST again, tags).

Then a head-only fine-tune step (every layer frozen but the classifier head), a second
save point, and its push: the bytes it sends against the save point's size.

Targets: ``s3``, moto's S3 server on 127.0.0.1 started here (it measures moto, a Python
server, more than the client: the ratio is the figure, not the MB/s); ``file``, a
``file://`` remote on the local disk. Needs ``pip install 'savepoints[remote]'`` and,
for s3, ``moto[server]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import obstore as obs
import torch

from savepoints import SavePoints
from savepoints.layout import MANIFEST_NAME
from savepoints.storage.remote import RemoteRun, open_store


def build(layers: int) -> Any:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, num_labels=3, pad_token_id=50256)
    return GPT2ForSequenceClassification(config)


def plain_put(url: str, folder: Path) -> float:
    store = open_store(url)
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda p: obs.put(store, str(p.relative_to(folder)), p), files))
    return time.perf_counter() - started


def push(url: str, folder: Path) -> tuple[float, int]:
    point = SavePoints(folder.parent, readonly=True).get(1)
    remote = RemoteRun.open(url, writable=True)
    started = time.perf_counter()
    report = remote.push(point.path, point.manifest)
    return time.perf_counter() - started, report.uploaded_bytes


def s3_target() -> tuple[str, Any]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP="true",
                      AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_REGION="us-east-1")  # fmt: skip
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/bench", method="PUT")).read()
    return "s3://bench", server


def spread(xs: list[float]) -> str:
    return f"{min(xs):7.2f} {statistics.median(xs):7.2f} {max(xs):7.2f}"


def measure(
    target: str, base: Path, folder: Path, size: int, repeats: int, second: Any
) -> dict[str, Any]:
    server = None
    if target == "s3":
        root, server = s3_target()
    else:
        root = (base / "remote").as_uri()
    try:
        plain, ours = [], []
        for _ in range(repeats):
            plain.append(plain_put(f"{root}/plain-{uuid.uuid4().hex[:8]}", folder))
            seconds, sent = push(f"{root}/push-{uuid.uuid4().hex[:8]}", folder)
            assert sent == size, (sent, size)
            ours.append(seconds)
        # The head-only fine-tune's save point, pushed to a remote that has the first.
        remote = RemoteRun.open(f"{root}/run-{uuid.uuid4().hex[:8]}", writable=True)
        point = SavePoints(folder.parent, readonly=True).get(1)
        remote.push(point.path, point.manifest)
        report = remote.push(second.path, second.manifest)
        return {"plain": plain, "push": ours, "second_sent": report.uploaded_bytes}
    finally:
        if server is not None:
            server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--target", choices=["s3", "file", "both"], default="both")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    base = Path(tempfile.mkdtemp(prefix="sp-remote-", dir=args.dir))
    try:
        model = build(args.layers)
        run = base / "run"
        with SavePoints(run) as points:
            first = points.save(1, model=model)
        size = first.size
        print(f"GPT-2 ({args.layers} layers) classifier: one save point of {size / 1e6:.0f} MB "
              f"in {len(first.manifest.files)} files; {args.repeats} repeats, seconds "
              "min/median/max\n")  # fmt: skip
        print(f"{'target':7} {'plain put':>23} {'savepoints push':>23} {'MB/s push':>10} "
              f"{'ratio':>6}")  # fmt: skip
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("score.")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model(torch.randint(0, 50257, (2, 16)), labels=torch.tensor([0, 2])).loss.backward()
        opt.step()
        with SavePoints(run) as points:
            second = points.save(2, model=model)
        targets = ["s3", "file"] if args.target == "both" else [args.target]
        second_sent: dict[str, tuple[int, int]] = {}
        for target in targets:
            r = measure(target, base, first.path, size, args.repeats, second)
            ratio = statistics.median(r["plain"]) / statistics.median(r["push"])
            rate = size / 1e6 / statistics.median(r["push"])
            print(f"{target:7} {spread(r['plain']):>23} {spread(r['push']):>23} {rate:10.0f} "
                  f"{ratio:6.2f}x")  # fmt: skip
            second_sent[target] = (r["second_sent"], second.size)
        head = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if n.startswith("score."))  # fmt: skip
        print("\nratio: plain put time / savepoints push time (1.00x = as fast as the plain "
              "put; goal >= 0.90x)")  # fmt: skip
        print(f"\nsecond push after a head-only step (head: {head / 1e3:.1f} kB):")
        for target, (sent, total) in second_sent.items():
            print(f"  {target:5} sent {sent / 1e3:9.1f} kB of {total / 1e6:.0f} MB "
                  f"({100 * sent / total:.3f}%)")  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
