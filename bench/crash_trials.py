"""Fault injection: SIGKILL training at random moments while it saves, then resume.

    python bench/crash_trials.py                      # 200 trials each: sync, async, deferred
    python bench/crash_trials.py --trials 50 --modes trainer-plain trainer-savepoints
    python bench/crash_trials.py --trials 20 --json out.json

Each trial starts a training process (``--worker``) that resumes from the run's latest
save point, trains one step to show it can, says "ready", and then trains and saves at
every step. After a random delay (uniform in 0..--max-delay seconds) the parent SIGKILLs
it: with a save every step, most kills land inside a save (during writing, hashing, the
commit, retention or gc); the table says how many. Then the parent checks the run:

* broken resume: the next process could not resume from the latest save point, or
  ``restore()`` of ``latest()`` raised, or what it restored differs from what was trained;
* lost save point: a save point whose commit the worker had seen is gone although
  retention (keep the last 2) had no reason to delete it;
* corrupt save point: a listed save point that fails ``verify()``.

The trials of a mode chain on one run folder (a job preempted again and again) and start
a new folder every --chain trials. Modes:

* ``sync`` / ``async`` / ``deferred``: a plain PyTorch loop (an MLP of 1.6M parameters
  and AdamW, 19 MB a save point) with ``SavePoints(keep=Keep(last=2))``: synchronous
  saves, asynchronous ones with eager snapshots, or with deferred snapshots (the copy
  runs while the next step computes; the optimizer step waits for it). Every weight
  digest a worker logs after a resume is compared with an uninterrupted reference run:
  resumes are exact, not just possible.
* ``trainer-savepoints``: ``transformers.Trainer`` (tiny GPT-2 classifier, ``save_steps=1``,
  ``save_total_limit=2``) with ``SavePointsCallback``, resumed with ``resume_path``.
* ``trainer-plain``: the same Trainer with its own ``checkpoint-N`` folders, resumed from
  ``get_last_checkpoint()``, the comparison. A broken run is started afresh, as a user
  would have to (after deleting the broken checkpoint by hand).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODES = ("sync", "async", "deferred", "trainer-savepoints", "trainer-plain")
#: The plain-loop modes: SavePoints options of each.
PLAIN = {
    "sync": {"async_save": False},
    "async": {"async_save": True, "snapshot": "eager"},
    "deferred": {"async_save": True, "snapshot": "deferred"},
}
KEEP_LAST = 2
IN, HIDDEN, OUT, BATCH = 512, 1024, 10, 32


# ---------------------------------------------------------------------- the plain loop


def build(seed: int = 0) -> tuple[Any, Any]:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(IN, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, OUT),
    )  # fmt: skip
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_step(model: Any, optimizer: Any, step: int) -> None:
    """Optimizer step number ``step`` (1-based); its batch depends on the step alone."""
    import torch

    g = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, IN, generator=g)
    y = torch.randint(0, OUT, (BATCH,), generator=g)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def digest(model: Any) -> str:
    import blake3

    h = blake3.blake3()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


class Log:
    """Events a worker leaves for the parent: one JSON line each, appended with one
    write() so a SIGKILL loses at most the event it was about to write."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def __call__(self, event: str, **fields: Any) -> None:
        os.write(self.fd, (json.dumps({"e": event, **fields}) + "\n").encode())


def read_log(path: Path) -> list[dict[str, Any]]:
    events = []
    if path.exists():
        for line in path.read_text().splitlines():
            # A torn line cannot happen with one write() per event; tolerated all the same.
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    return events


def plain_worker(run: Path, log: Log, options: dict[str, Any]) -> None:
    import torch

    from savepoints import Keep, SavePoints

    torch.set_num_threads(1)
    model, optimizer = build()
    async_save = options["async_save"]
    with SavePoints(run, keep=Keep(last=KEEP_LAST), **options) as points:
        step = 0
        if points.latest() is not None:
            step = points.restore(model=model, optimizer=optimizer, fallback=False)["step"]
        log("resumed", step=step, digest=digest(model))
        pending: list[Any] = []
        ready = False
        while True:
            step += 1
            train_step(model, optimizer, step)
            log("trained", step=step, digest=digest(model))
            if not ready:  # resumed and trained a step: the resume worked
                print("ready", flush=True)
                ready = True
            log("save-begin", step=step)
            result = points.save(step, model=model, optimizer=optimizer, state={"step": step})
            pending.append(result)
            # A save returned synchronously is committed; an async one is once done().
            still = []
            for p in pending:
                if not async_save or p.done():
                    log("committed", step=p.step)
                else:
                    still.append(p)
            pending = still
            if not async_save:
                log("save-end", step=step)


# ---------------------------------------------------------------------- the Trainer


def trainer_worker(run: Path, log: Log, use_savepoints: bool) -> None:
    import torch
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.trainer_utils import get_last_checkpoint

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(
        GPT2Config(n_layer=4, n_head=4, n_embd=256, n_positions=64, vocab_size=5000,
                   num_labels=3, pad_token_id=0)
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(1, 5000, (32,), generator=g), "labels": torch.tensor(i % 3)}
        for i in range(512)
    ]

    class Events(TrainerCallback):
        first = True

        def on_step_end(self, args, state, control, **kwargs):
            log("trained", step=state.global_step)
            if self.first:
                self.first = False
                print("ready", flush=True)
            log("save-begin", step=state.global_step)

        def on_save(self, args, state, control, **kwargs):
            log("committed", step=state.global_step)
            log("save-end", step=state.global_step)

    args = TrainingArguments(
        output_dir=str(run if not use_savepoints else run.parent / (run.name + "-hf")),
        per_device_train_batch_size=4,
        max_steps=100_000,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=KEEP_LAST,
        logging_steps=1000,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callbacks: list[Any] = [Events()]
    points = None
    if use_savepoints:
        from savepoints import SavePoints
        from savepoints.transformers import SavePointsCallback, resume_path

        points = SavePoints(run)
        callbacks.insert(0, SavePointsCallback(points, preemption=False))
        resume = resume_path(points)
    else:
        resume = get_last_checkpoint(str(run)) if run.is_dir() else None
    log("resumed", step=-1, checkpoint=resume)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)


# ---------------------------------------------------------------------- the parent


@dataclass
class Tally:
    mode: str
    trials: int = 0
    killed_during_save: int = 0
    broken_resumes: int = 0
    inexact_resumes: int = 0
    lost_save_points: int = 0
    corrupt_save_points: int = 0
    committed_seen: int = 0
    staging_cleaned: int = 0
    fresh_runs: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def error(self, text: str) -> None:
        last = text.strip().splitlines()[-1] if text.strip() else "(no message)"
        key = re.sub(r"/\S+/", ".../", last)[:160]  # group by message, not by folder
        self.errors[key] = self.errors.get(key, 0) + 1


def start_worker(mode: str, run: Path, log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", mode, "--run", str(run), "--log", str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false"},
    )  # fmt: skip


def one_trial(mode: str, run: Path, log: Path, max_delay: float, rng: random.Random,
              tally: Tally, reference: Callable[[int], str]) -> bool:  # fmt: skip
    """One start + SIGKILL + checks. Returns False when the run cannot go on."""
    before = len(read_log(log))
    proc = start_worker(mode, run, log)
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.wait()
        tally.broken_resumes += 1
        tally.error(proc.stderr.read())
        return False
    time.sleep(rng.uniform(0, max_delay))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    tally.trials += 1
    events = read_log(log)
    mine = events[before:]
    open_saves = {e["step"] for e in mine if e["e"] == "save-begin"} - {
        e["step"] for e in mine if e["e"] == "committed"
    }
    tally.killed_during_save += bool(open_saves)
    committed = {e["step"] for e in events if e["e"] == "committed"}
    tally.committed_seen = max(tally.committed_seen, len(committed))
    if mode in PLAIN:
        for e in mine:
            trained = e["e"] in ("trained", "resumed") and e["step"] > 0
            if trained and e["digest"] != reference(e["step"]):
                tally.inexact_resumes += 1
                break
        check_savepoints_run(run, committed, tally, reference)
    elif mode == "trainer-savepoints":
        check_savepoints_run(run, committed, tally, None)
    else:
        check_trainer_run(run, committed, tally)
    return True


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += "uncommitted leftover" in record.getMessage()


def check_savepoints_run(run: Path, committed: set[int], tally: Tally,
                         reference: Callable[[int], str] | None) -> None:  # fmt: skip
    from savepoints import SavePoints

    # Opening for writing takes over the killed writer's lock and cleans its staging
    # (counted, not printed: it is the expected aftermath of a kill inside a save).
    logger = logging.getLogger("savepoints")
    counter, level = _Count(), logger.level
    logger.addHandler(counter)
    logger.setLevel(logging.WARNING)  # the handler sees warnings; nothing propagates
    logger.propagate = False
    try:
        points = SavePoints(run)
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)
        logger.propagate = True
    tally.staging_cleaned += bool(counter.n)
    with points:
        steps = [p.step for p in points.list()]
        for p in points.list():
            if not p.verify().ok:
                tally.corrupt_save_points += 1
        for s in committed:
            if s not in steps and sum(t > s for t in steps) < KEEP_LAST:
                tally.lost_save_points += 1
        staging = run / ".savepoints" / "staging"
        if staging.is_dir() and any(staging.iterdir()):
            tally.error("staging not cleaned on reopen")
        if reference is None or not steps:
            return
        model, optimizer = build(seed=1)  # other weights: the restore must replace them all
        try:
            state = points.restore(model=model, optimizer=optimizer, fallback=False)
        except Exception as e:  # a failed restore is what this counts
            tally.broken_resumes += 1
            tally.error(f"{type(e).__name__}: {e}")
            return
        if state["step"] != steps[-1] or digest(model) != reference(steps[-1]):
            tally.inexact_resumes += 1


def check_trainer_run(run: Path, committed: set[int], tally: Tally) -> None:
    present = {int(p.name.split("-")[1]) for p in run.glob("checkpoint-*") if p.is_dir()}
    for s in committed:
        if s not in present and sum(t > s for t in present) < KEEP_LAST:
            tally.lost_save_points += 1


class Reference:
    """Weight digests of an uninterrupted run, step by step, computed as needed."""

    def __init__(self) -> None:
        import torch

        torch.set_num_threads(1)
        self.model, self.optimizer = build()
        self.digests: dict[int, str] = {}
        self.step = 0

    def __call__(self, step: int) -> str:
        while self.step < step:
            self.step += 1
            train_step(self.model, self.optimizer, self.step)
            self.digests[self.step] = digest(self.model)
        return self.digests[step]


def run_trials(mode: str, trials: int, *, base: Path, max_delay: float = 1.0, chain: int = 25,
               seed: int = 0, progress: Callable[[], None] | None = None) -> Tally:  # fmt: skip
    """``trials`` SIGKILLs of ``mode`` training, checked after each; returns the tally."""
    rng = random.Random(f"{mode}-{seed}")
    tally = Tally(mode)
    reference = Reference() if mode in PLAIN else (lambda step: "")
    started = time.monotonic()
    run_no = 0
    run = log = base
    done_in_run = chain
    while tally.trials < trials:
        if done_in_run >= chain:
            run_no += 1
            run, log = base / f"{mode}-{run_no}", base / f"{mode}-{run_no}.log"
            tally.fresh_runs += 1
            done_in_run = 0
            if mode in PLAIN:
                reference = Reference()  # each run starts from step 0
        before = tally.trials
        ok = one_trial(mode, run, log, max_delay, rng, tally, reference)
        done_in_run += 1
        if tally.trials > before and progress is not None:
            progress()
        if not ok:
            # A run that cannot resume is abandoned: a user would start over (or dig out
            # the broken checkpoint by hand). A second failure in a fresh run is a bug in
            # the worker itself: stop instead of looping.
            if done_in_run == 1:
                raise RuntimeError(f"{mode}: a fresh run failed to start: {tally.errors}")
            done_in_run = chain
    tally.seconds = time.monotonic() - started
    return tally


def table(tallies: list[Tally]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="SIGKILL at random moments while saving every step, then resume")
    for col in ("mode", "trials", "killed in a save", "staging left", "broken resumes",
                "inexact resumes", "save points lost", "corrupt save points", "runs",
                "seconds"):  # fmt: skip
        t.add_column(col, justify="left" if col == "mode" else "right")
    for r in tallies:
        bad = "red" if r.broken_resumes or r.lost_save_points or r.corrupt_save_points else "green"
        t.add_row(
            r.mode, str(r.trials), str(r.killed_during_save),
            str(r.staging_cleaned) if r.mode != "trainer-plain" else "-",
            f"[{bad}]{r.broken_resumes}[/]",
            str(r.inexact_resumes), str(r.lost_save_points), str(r.corrupt_save_points),
            str(r.fresh_runs), f"{r.seconds:.0f}",
        )  # fmt: skip
    console = Console(width=max(130, Console().width))
    console.print(t)
    for r in tallies:
        for text, n in r.errors.items():
            console.print(f"  {r.mode}: {n} x {text}")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--modes", nargs="+", choices=MODES, default=["sync", "async", "deferred"])
    ap.add_argument("--trials", type=int, default=200, help="trials per mode")
    ap.add_argument("--max-delay", type=float, default=1.0, help="seconds; kill after U(0, this)")
    ap.add_argument("--chain", type=int, default=25, help="trials per run folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the tallies here")
    ap.add_argument("--keep", action="store_true", help="keep the run folders")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--log", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        log = Log(Path(args.log))
        if args.worker in PLAIN:
            plain_worker(Path(args.run), log, PLAIN[args.worker])
        else:
            trainer_worker(Path(args.run), log, use_savepoints=args.worker == "trainer-savepoints")
        return 0

    from rich.progress import Progress

    base = Path(tempfile.mkdtemp(prefix="crash-trials-"))
    tallies = []
    try:
        with Progress() as bar:
            for mode in args.modes:
                task = bar.add_task(mode, total=args.trials)
                tally = run_trials(
                    mode, args.trials, base=base, max_delay=args.max_delay, chain=args.chain,
                    seed=args.seed, progress=lambda task=task: bar.advance(task),
                )  # fmt: skip
                tallies.append(tally)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    table(tallies)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(t) for t in tallies], indent=2) + "\n")
    savepoints_ok = all(
        not (t.broken_resumes or t.lost_save_points or t.corrupt_save_points or t.inexact_resumes)
        for t in tallies
        if t.mode != "trainer-plain"
    )
    return 0 if savepoints_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
