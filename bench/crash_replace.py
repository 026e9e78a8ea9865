"""Fault injection: SIGKILL while a save point that already exists is being replaced.

    python bench/crash_replace.py                     # 100 trials each of replace and compact
    python bench/crash_replace.py --trials 300 --modes replace
    python bench/crash_replace.py --json out.json

Replacing a step is what ``save(step, overwrite=True)`` does (the Trainer callback always
saves so) and what ``compact(step)`` / ``compact(step, expand=True)`` do. A crash at any
moment of it must leave that step with its old version or its new one, never with
neither, and every other step untouched.

Each trial starts a worker that opens the run for writing (as a resumed job would), says
"ready" and then rewrites steps 1..3 in a loop until it is killed:

* ``replace``: ``save(step, model=..., optimizer=..., overwrite=True)`` with new weights
  (an MLP of 1M parameters and AdamW, 13 MB a save point);
* ``compact``: ``compact(step)`` or ``compact(step, expand=True)``, whichever applies.

Every save records a version number in ``metrics`` and ``state``; the weights are a
function of it, so each version is identifiable and its content checkable. Half of the
trials kill the worker at a uniformly random moment in 0..--max-delay seconds after it is
ready (most land inside a replace; the table says how many). The other half kill it as
soon as the kernel reports (inotify) that a step folder was moved out of the run, plus a
random 0..--jitter seconds: that aims at the few milliseconds in which the old version
is out of its place, which random kills rarely hit. Then the parent opens the run for
writing (which runs the recovery of what the crash left) and checks every step:

* lost: a step that was committed before is gone;
* not verifying: ``verify()`` fails;
* wrong content: its version is neither the old nor the new one (or, for a step no
  replace was touching, not the one it had), or what ``restore()`` loads into a model
  differs from that version's weights;
* old kept / new kept: which version the step being replaced came back with.

A trial that loses a step starts a fresh run folder (a user would have to); otherwise a
new folder is started every --chain trials.

Workers are forked from one process that imported torch once (a "zygote"), so a trial
costs a fork, not an interpreter start.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The event log and weight digest of the other crash bench (a sibling in bench/).
from crash_trials import Log, digest, read_log

MODES = ("replace", "compact")
STEPS = (1, 2, 3)
IN, HIDDEN, OUT = 512, 1024, 512
#: A worker that outlives its parent (a crashed test run) stops after this many seconds.
WORKER_LIFETIME = 120.0


# ---------------------------------------------------------------------- the model


def build() -> tuple[Any, Any]:
    """The model and an AdamW with state (one step taken), the same in every process."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, IN)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def set_version(model: Any, version: int) -> None:
    """Weights that are a function of ``version`` alone."""
    import torch

    g = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def version_number(trial: int, op: int) -> int:
    """Unique within a run: the trial that wrote it and the op's number in that trial."""
    return trial * 100_000 + op


# ---------------------------------------------------------------------- the worker


def worker(job: dict[str, Any], ready: Callable[[], None]) -> None:
    """Rewrite the steps of ``job["run"]`` until killed (or orphaned)."""
    import torch

    from savepoints import SavePoints

    torch.set_num_threads(1)
    log = Log(Path(job["log"]))
    rng = random.Random(job["seed"])
    parent = os.getppid()
    deadline = time.monotonic() + WORKER_LIFETIME
    model, optimizer = build()
    op = 0

    def save(step: int, overwrite: bool) -> None:
        nonlocal op
        op += 1
        version = version_number(job["trial"], op)
        set_version(model, version)
        log("begin", op="replace", step=step, version=version, compacted=False)
        sp = points.save(
            step, model=model, optimizer=optimizer, metrics={"version": version},
            state={"version": version}, overwrite=overwrite,
        )  # fmt: skip
        log("end", step=step, version=version, compacted=False, path=str(sp.path))

    with SavePoints(job["run"], async_save=False) as points:
        if job["fresh"]:
            for step in STEPS:
                save(step, overwrite=False)
        ready()
        while os.getppid() == parent and time.monotonic() < deadline:
            step = rng.choice(STEPS)
            if job["mode"] == "replace":
                save(step, overwrite=True)
                continue
            old = points.get(step)
            version, was = old.state["version"], "compacted" in old.contents
            log("begin", op="expand" if was else "compact", step=step, version=version,
                compacted=not was)  # fmt: skip
            sp = points.compact(step, expand=was)
            log("end", step=step, version=version, compacted=not was, path=str(sp.path))


def zygote() -> None:
    """Import torch and savepoints once, then fork one worker per job line on stdin.

    Protocol on stdout, one line each: ``ready PID`` (from the worker, once it is about to
    start replacing), ``exit PID STATUS`` (once the worker is reaped, whatever ended it).
    A worker that fails logs an ``error`` event with its traceback and exits 1."""
    import torch

    import savepoints  # noqa: F401  (imported before forking: that is the point)

    # The first optimizer imports torch._dynamo (seconds): do it here, once. No kernel
    # runs before the fork, so no thread pool is started that a child would inherit.
    torch.optim.AdamW([torch.nn.Parameter(torch.empty(1))])

    with contextlib.suppress(ImportError):
        import zstandard  # noqa: F401
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                worker(job, lambda: os.write(1, f"ready {os.getpid()}\n".encode()))
            except BaseException:
                code = 1
                text = traceback.format_exc()
                sys.stderr.write(text)
                with contextlib.suppress(BaseException):
                    Log(Path(job["log"]))("error", text=text)
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        os.write(1, f"exit {pid} {status}\n".encode())
    os._exit(0)  # nothing to flush; torch's interpreter teardown takes seconds


class Zygote:
    """The parent's handle on the zygote process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--zygote"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )  # fmt: skip
        self._buf = b""

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError("no word from the worker")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the zygote exited ({self.proc.wait()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def start(self, job: dict[str, Any], timeout: float = 60.0) -> tuple[int, int | None]:
        """Fork a worker for ``job``: (pid, None) once it is ready, or (pid, status) when
        it exited before."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        word, pid, *rest = self._line(timeout).split()
        return int(pid), (int(rest[0]) if word == "exit" else None)

    def reap(self, pid: int, timeout: float = 60.0) -> int:
        word, got, status = self._line(timeout).split()
        assert word == "exit" and int(got) == pid, (word, got, pid)
        return int(status)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# ---------------------------------------------------------------------- the kill


IN_MOVED_FROM = 0x40


class MovedOut:
    """inotify on a run folder: counts entries renamed out of it (a step folder leaving
    its place, for the trash). None from :meth:`open` where inotify is not available."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, folder: Path) -> MovedOut | None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError):
            return None
        if fd < 0:
            return None
        if libc.inotify_add_watch(fd, str(folder).encode(), IN_MOVED_FROM) < 0:
            os.close(fd)
            return None
        return cls(fd)

    def wait(self, count: int, timeout: float) -> bool:
        """Block until ``count`` moves out have happened; False on timeout."""
        seen, end = 0, time.monotonic() + timeout
        while seen < count:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return False
            buf = os.read(self.fd, 1 << 16)
            pos = 0
            while pos < len(buf):
                _wd, mask, _cookie, size = struct.unpack_from("iIII", buf, pos)
                seen += bool(mask & IN_MOVED_FROM)
                pos += 16 + size
        return True

    def close(self) -> None:
        os.close(self.fd)


# ---------------------------------------------------------------------- the parent


@dataclass
class Tally:
    mode: str
    trials: int = 0
    kills_uniform: int = 0
    kills_at_move: int = 0
    killed_in_replace: int = 0
    #: A step folder was absent right after the kill (before recovery): the kill landed
    #: between the old version leaving its place and the new one arriving.
    killed_while_absent: int = 0
    steps_lost: int = 0
    steps_not_verifying: int = 0
    wrong_content: int = 0
    old_kept: int = 0
    new_kept: int = 0
    #: Trials that found a step lost, not verifying or wrong, by how the kill was timed.
    failed_uniform: int = 0
    failed_at_move: int = 0
    fresh_runs: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.steps_lost or self.steps_not_verifying or self.wrong_content
                    or self.errors)  # fmt: skip

    def error(self, text: str) -> None:
        last = text.strip().splitlines()[-1] if text.strip() else "(no message)"
        key = re.sub(r"/\S+/", ".../", last)[:160]  # group by message, not by folder
        self.errors[key] = self.errors.get(key, 0) + 1


#: A step's identity: (version, compacted).
Version = tuple[int, bool]


class Reference:
    """Weight digests by version, computed as needed; and a model and optimizer to
    restore into (every restore replaces all of their state)."""

    def __init__(self) -> None:
        self.model, _ = build()
        self.target = build()
        self.digests: dict[int, str] = {}

    def __call__(self, version: int) -> str:
        if version not in self.digests:
            set_version(self.model, version)
            self.digests[version] = digest(self.model)
        return self.digests[version]


class RunState:
    """What the parent knows of one run folder: each step's committed version."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.log = run.with_suffix(".log")
        self.expected: dict[int, Version] = {}
        self.paths: dict[int, Path] = {}
        self.read = 0

    def events(self) -> list[dict[str, Any]]:
        events = read_log(self.log)
        new, self.read = events[self.read :], len(events)
        return new


def one_trial(zyg: Zygote, mode: str, state: RunState, trial: int, at_move: bool,
              rng: random.Random, tally: Tally, reference: Reference, *,
              max_delay: float, jitter: float) -> bool:  # fmt: skip
    """Start a worker, SIGKILL it, check the run. Returns False when the run lost a step
    (or could not go on) and a fresh one must be started."""
    job = {"mode": mode, "run": str(state.run), "log": str(state.log), "trial": trial,
           "seed": rng.getrandbits(32), "fresh": not state.expected}  # fmt: skip
    pid, exited = zyg.start(job)
    if exited is not None:
        errors = [e["text"] for e in state.events() if e["e"] == "error"]
        tally.error(errors[-1] if errors else f"worker exited with status {exited} before ready")
        return False
    watch = MovedOut.open(state.run) if at_move else None
    try:
        if watch is not None:
            # The first to third move: not always the first op after the start.
            if not watch.wait(rng.randint(1, 3), timeout=30.0):
                tally.error("no step folder was moved out within 30 s")
            time.sleep(rng.uniform(0, jitter))
        else:
            time.sleep(rng.uniform(0, max_delay))
    finally:  # also when interrupted: never leave a worker rewriting the run
        with contextlib.suppress(ProcessLookupError):  # it failed and was reaped already
            os.kill(pid, signal.SIGKILL)
        if watch is not None:
            watch.close()
    status = zyg.reap(pid)
    tally.trials += 1
    tally.kills_at_move += watch is not None
    tally.kills_uniform += watch is None
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        errors = [e["text"] for e in read_log(state.log) if e["e"] == "error"]
        tally.error(errors[-1] if errors else f"worker ended with status {status}, not killed")

    inflight: dict[str, Any] | None = None
    for e in state.events():
        if e["e"] == "begin":
            inflight = e
        elif e["e"] == "end":
            state.expected[e["step"]] = (e["version"], e["compacted"])
            state.paths[e["step"]] = Path(e["path"])
            inflight = None
    if inflight is not None and inflight["step"] in state.expected:
        tally.killed_in_replace += 1
    tally.killed_while_absent += any(not p.is_dir() for p in state.paths.values())
    ok = check(state, inflight, tally, reference)
    if not ok:
        tally.failed_at_move += watch is not None
        tally.failed_uniform += watch is None
    return ok


def check(state: RunState, inflight: dict[str, Any] | None, tally: Tally,
          reference: Reference) -> bool:  # fmt: skip
    from savepoints import SavePoints, SavePointsError

    logger = logging.getLogger("savepoints")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "removed leftovers" is the expected aftermath
    try:
        points = SavePoints(state.run)  # for writing: this runs the recovery
    finally:
        logger.setLevel(level)
    lost = False
    with points:
        steps = set(state.expected) | ({inflight["step"]} if inflight else set())
        for step in sorted(steps):
            old = state.expected.get(step)
            new = None
            if inflight is not None and inflight["step"] == step:
                new = (inflight["version"], inflight["compacted"])
            try:
                sp = points.get(step)
            except SavePointsError:
                if old is not None:
                    tally.steps_lost += 1
                    lost = True
                continue  # a step that was being created may be absent
            if not sp.verify().ok:
                tally.steps_not_verifying += 1
                lost = True
                continue
            got = (sp.state.get("version"), "compacted" in sp.contents)
            if got == new:
                tally.new_kept += 1
            elif got == old:
                tally.old_kept += new is not None
            else:
                tally.wrong_content += 1
                lost = True
                continue
            model, optimizer = reference.target
            set_version(model, 0)  # not a version any step has: the restore must replace it
            try:
                # Verified just above; restore's own check would hash everything again.
                points.restore(sp, model=model, optimizer=optimizer, rng=False, verify=False)
            except SavePointsError as e:
                tally.error(f"restore: {type(e).__name__}: {e}")
                lost = True
                continue
            if digest(model) != reference(got[0]) or sp.metrics.get("version") != got[0]:
                tally.wrong_content += 1
                lost = True
                continue
            state.expected[step] = got
    return not lost


def run_trials(mode: str, trials: int, *, base: Path, max_delay: float = 1.0,
               jitter: float = 0.002, chain: int = 25, seed: int = 0,
               zygote: Zygote | None = None,
               progress: Callable[[], None] | None = None) -> Tally:  # fmt: skip
    """``trials`` SIGKILLs of ``mode`` workers, alternately uniform and aimed at a move,
    each checked; returns the tally."""
    rng = random.Random(f"{mode}-{seed}")
    tally = Tally(mode)
    base.mkdir(parents=True, exist_ok=True)
    reference = Reference()
    zyg = zygote or Zygote()
    started = time.monotonic()
    state: RunState | None = None
    done_in_run = attempt = 0
    try:
        while tally.trials < trials:
            if state is None or done_in_run >= chain:
                tally.fresh_runs += 1
                state = RunState(base / f"{mode}-{tally.fresh_runs}")
                done_in_run = 0
            before = tally.trials
            attempt += 1
            ok = one_trial(zyg, mode, state, attempt,
                           at_move=tally.trials % 2 == 1, rng=rng, tally=tally,
                           reference=reference, max_delay=max_delay, jitter=jitter)  # fmt: skip
            done_in_run += 1
            if tally.trials > before and progress is not None:
                progress()
            if not ok:
                if done_in_run == 1 and tally.trials == before:
                    raise RuntimeError(f"{mode}: a fresh run failed to start: {tally.errors}")
                state = None
    finally:
        if zygote is None:
            zyg.close()
    tally.seconds = time.monotonic() - started
    return tally


def table(tallies: list[Tally]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="SIGKILL while a step is replaced (save overwrite=True, compact/expand)")
    for col in ("mode", "trials", "uniform / at a move", "killed in a replace",
                "step absent at kill", "steps lost", "not verifying", "wrong content",
                "old kept", "new kept", "failed trials: uniform / at a move", "runs",
                "seconds"):  # fmt: skip
        t.add_column(col, justify="left" if col == "mode" else "right")
    for r in tallies:
        bad = "green" if r.ok else "red"
        t.add_row(
            r.mode, str(r.trials), f"{r.kills_uniform} / {r.kills_at_move}",
            str(r.killed_in_replace), str(r.killed_while_absent),
            f"[{bad}]{r.steps_lost}[/]", f"[{bad}]{r.steps_not_verifying}[/]",
            f"[{bad}]{r.wrong_content}[/]", str(r.old_kept), str(r.new_kept),
            f"[{bad}]{r.failed_uniform} / {r.failed_at_move}[/]",
            str(r.fresh_runs), f"{r.seconds:.0f}",
        )  # fmt: skip
    console = Console(width=max(140, Console().width))
    console.print(t)
    for r in tallies:
        for text, n in r.errors.items():
            console.print(f"  {r.mode}: {n} x {text}")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--trials", type=int, default=100, help="trials per mode")
    ap.add_argument("--max-delay", type=float, default=1.0,
                    help="seconds; uniform kills after U(0, this)")  # fmt: skip
    ap.add_argument("--jitter", type=float, default=0.002,
                    help="seconds; aimed kills after a move plus U(0, this)")  # fmt: skip
    ap.add_argument("--chain", type=int, default=25, help="trials per run folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the tallies here")
    ap.add_argument("--keep", action="store_true", help="keep the run folders")
    ap.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.zygote:
        zygote()
        return 0

    from rich.progress import Progress

    base = Path(tempfile.mkdtemp(prefix="crash-replace-"))
    tallies = []
    zyg = Zygote()
    try:
        with Progress() as bar:
            for mode in args.modes:
                task = bar.add_task(mode, total=args.trials)
                tallies.append(run_trials(
                    mode, args.trials, base=base, max_delay=args.max_delay,
                    jitter=args.jitter, chain=args.chain, seed=args.seed, zygote=zyg,
                    progress=lambda task=task: bar.advance(task),
                ))  # fmt: skip
    finally:
        zyg.close()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    table(tallies)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(t) for t in tallies], indent=2) + "\n")
    return 0 if all(t.ok for t in tallies) else 1


if __name__ == "__main__":
    raise SystemExit(main())
