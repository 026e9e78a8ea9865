"""Preemption: turn SIGTERM / SIGUSR1 into an emergency save point at the next step.

Schedulers warn a job before they kill it: Kubernetes and most clouds send SIGTERM and
SIGKILL a grace period later (30 s by default), SLURM sends SIGTERM (or, with
``--signal=USR1@120``, SIGUSR1 two minutes ahead). A training step cannot be cut in
half safely, so the handler only records the request; the training loop looks at
:attr:`Preemption.requested` after each optimizer step, takes a save point and calls
:meth:`Preemption.exit`::

    with SavePoints("runs/r") as points, Preemption(deadline=60) as preemption:
        for step in range(start, total):
            train_step()
            if step % 500 == 0 or preemption.requested:
                points.save(step, model=model, optimizer=optimizer)
            if preemption.requested:
                preemption.exit(points)   # waits for the save, exits with EXIT_PREEMPTED

Exit codes (documented in the README):

* :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL`` of sysexits.h, "try again"): an emergency
  save point was committed; running the same command again resumes exactly there.
* :data:`EXIT_DEADLINE` (76): the deadline passed before the loop reached a step
  boundary and committed its save point. The process leaves anyway, before the
  scheduler's SIGKILL; a save in flight is abandoned (its staging folder is removed when
  the run is next opened) and the run resumes from its last committed save point.

A request the loop never acts on (the ``with`` block ends first) is not swallowed: the
signal is delivered again to the handler that was there before, as if savepoints had
never deferred it.

**Several ranks** (``torch.distributed``): a signal may reach one rank only (a node's
agent, a ``kill`` by hand) or all of them (``torchrun`` forwards SIGTERM to every
worker, and SIGKILLs them 30 s later). Every rank calls :meth:`Preemption.should_stop`
once per step instead of reading :attr:`~Preemption.requested`: it tells every rank
whether *any* rank got a signal (one tiny collective over the run's ranks), so all of
them save the same step and exit together. The emergency save point records the signal
(``savepoints list`` shows it), and :meth:`Preemption.exit` leaves a mark in the run,
``.savepoints/preempted.json`` (step, signal, exit code), for a scheduler or wrapper
script: ``torchrun`` itself reports exit code 1 when a worker exits with 75. The mark
stays until the run is next opened for writing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from savepoints.errors import InvalidArgumentError
from savepoints.layout import RunLayout

EXIT_PREEMPTED = 75
EXIT_DEADLINE = 76
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
DEFAULT_DEADLINE = 25.0  # seconds; under the 30 s grace of Kubernetes and SLURM's KillWait


#: The preemption request this process acts on (a signal name; set when a signal arrives
#: or when the ranks agree that one arrived elsewhere), recorded in the save point
#: taken for it. One per process: the process exits after acting on it.
_request: str | None = None


def preemption_request() -> str | None:
    """The signal a save point taken now answers (None when none is pending)."""
    return _request


def _signal_number(sig: int | str) -> signal.Signals:
    try:
        if isinstance(sig, str):
            name = sig.upper()
            return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
        return signal.Signals(sig)
    except (KeyError, ValueError):
        raise InvalidArgumentError(
            f"Unknown signal {sig!r} for Preemption.",
            "Use names like 'SIGTERM' or 'SIGUSR1', or signal.SIGTERM.",
        ) from None


def _say(text: str) -> None:
    # os.write, not print: a handler may run while the main thread is inside a write to
    # stderr, and a buffered write from here would fail as reentrant.
    with contextlib.suppress(OSError):
        os.write(2, f"savepoints: {text}\n".encode())


class Preemption:
    """Defers preemption signals to the next step boundary of a training loop.

    ``signals``: which signals mean "save and stop" (default SIGTERM and SIGUSR1).
    ``deadline``: seconds from the signal within which the emergency save point must be
    committed; past it the process exits with :data:`EXIT_DEADLINE` (None: no deadline).
    ``exit_code``: the code :meth:`exit` uses (default :data:`EXIT_PREEMPTED`).

    Use it as a context manager (or :meth:`install` / :meth:`uninstall`) in the main
    thread: Python delivers signals only there.
    """

    def __init__(
        self,
        signals: Iterable[int | str] = DEFAULT_SIGNALS,
        *,
        deadline: float | None = DEFAULT_DEADLINE,
        exit_code: int = EXIT_PREEMPTED,
    ) -> None:
        self.signals = tuple(dict.fromkeys(_signal_number(s) for s in signals))
        if not self.signals:
            raise InvalidArgumentError(
                "Preemption needs at least one signal.", "Leave signals= at its default."
            )
        if deadline is not None and not (isinstance(deadline, (int, float)) and deadline > 0):
            raise InvalidArgumentError(
                f"Preemption deadline must be a positive number of seconds, not {deadline!r}.",
                "Pass deadline=60 (or None for no deadline).",
            )
        self.deadline = None if deadline is None else float(deadline)
        self.exit_code = exit_code
        self.received: signal.Signals | None = None
        self._at: float | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._watchdog: threading.Timer | None = None
        self._installed = False
        self._exiting = False
        #: Whether the ranks agreed (:meth:`should_stop`) that one of them got a signal.
        self.agreed = False

    # ------------------------------------------------------------------ state

    @property
    def requested(self) -> bool:
        """True once a preemption signal arrived: save and call :meth:`exit`."""
        return self.received is not None

    def should_stop(self, points: Any = None) -> bool:
        """Whether to take an emergency save point now and exit: this process got a
        signal, or, when ``points`` is a multi-rank run, any of its ranks did. In a
        multi-rank run it is collective: every rank calls it once per step (at the same
        step). It never clears a request: a signal that arrives while the ranks compare
        notes is acted on at the next step."""
        global _request
        ranks = getattr(points, "ranks", None)
        mine = self.received.name if self.received is not None else None
        heard = [mine] if ranks is None else ranks.all_gather_json(mine, "the preemption check")
        got = [(rank, name) for rank, name in enumerate(heard) if name is not None]
        agreed = bool(got)
        if agreed and not self.agreed:
            self.agreed = True
            _request = mine or got[0][1]
            if mine is None:
                _say(
                    f"rank {getattr(ranks, 'rank', '?')}: rank {got[0][0]} got {got[0][1]}; "
                    "taking the emergency save point with it"
                )
                if self.deadline is not None and self._watchdog is None:
                    self._at = time.monotonic()
                    self._start_watchdog()
        return agreed

    @property
    def remaining(self) -> float | None:
        """Seconds left before the deadline (None before a signal or without deadline)."""
        if self._at is None or self.deadline is None:
            return None
        return max(0.0, self.deadline - (time.monotonic() - self._at))

    @property
    def installed(self) -> bool:
        return self._installed

    # ------------------------------------------------------------------ install

    def install(self) -> Preemption:
        """Install the handlers. Only the main thread can; elsewhere this raises."""
        if self._installed:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise InvalidArgumentError(
                "Preemption handlers can only be installed from the main thread "
                f"(this is {threading.current_thread().name!r}).",
                "Create and enter the Preemption in the main thread, or run training there.",
            )
        global _request
        self.received, self._at, self._exiting = None, None, False
        self.agreed = False
        _request = None
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._installed = True
        return self

    def uninstall(self, *, deliver_pending: bool = True) -> None:
        """Put back the handlers that were there before. A request that was never acted
        on is delivered to them now (unless ``deliver_pending`` is False: an exception is
        already ending the program)."""
        global _request
        if not self._installed:
            return
        _request = None
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        self._installed = False
        self._cancel_watchdog()
        pending, self.received = self.received, None
        if pending is not None and deliver_pending and not self._exiting:
            _say(f"{pending.name} arrived after the last step; delivering it now")
            signal.raise_signal(pending)

    def __enter__(self) -> Preemption:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        # An exception (SystemExit from exit() too) is already ending this block.
        self.uninstall(deliver_pending=exc[0] is None)

    # ------------------------------------------------------------------ handling

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            return  # a second signal changes nothing: the deadline runs from the first
        self.received = signal.Signals(signum)
        self._at = time.monotonic()
        when = f"within {self.deadline:g} s" if self.deadline is not None else "(no deadline)"
        _say(
            f"got {self.received.name}: taking an emergency save point at the next step "
            f"boundary {when}, then exiting with code {self.exit_code}"
        )
        if self.deadline is not None:
            self._start_watchdog()

    def _start_watchdog(self) -> None:
        assert self.deadline is not None
        self._watchdog = threading.Timer(self.deadline, self._deadline_passed)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _deadline_passed(self) -> None:
        what = self.received.name if self.received else "the signal"
        _say(
            f"the {self.deadline:g} s deadline after {what} passed before an emergency "
            "save point was committed; exiting with code "
            f"{EXIT_DEADLINE}. Committed save points are intact: run again to resume from "
            "the last one."
        )
        os._exit(EXIT_DEADLINE)

    def _cancel_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def exit(self, points: Any = None, *, step: int | None = None) -> NoReturn:
        """Wait for ``points``' saves in flight (the deadline still applies), then leave
        with ``exit_code`` by raising SystemExit, so ``with`` blocks close cleanly."""
        what = self.received.name if self.received else "a preemption request"
        unpushed: list[int] = []
        if points is not None:
            # The emergency save point is committed locally first; then it is pushed to
            # the run's remote (if any) within what is left of the deadline.
            last = points.wait(remote=False) or points.latest()
            if step is None and last is not None:
                step = last.step
            if getattr(points, "remote", None):
                unpushed = points.wait_pushed(self.remaining)
            ranks = getattr(points, "ranks", None)
            if ranks is None or ranks.is_main:
                self._leave_mark(points.path, step, _request or what)
            journal = getattr(points, "journal", None)
            if journal is not None:
                journal.record("preempted", step=step, signal=_request or what,
                               exit_code=self.exit_code)  # fmt: skip
        self._cancel_watchdog()
        self._exiting = True
        where = f" at step {step}" if step is not None else ""
        if unpushed:
            _say(
                f"step(s) {', '.join(map(str, unpushed))} committed in {points.path} but not "
                f"pushed to {points.remote} before the deadline: they are pushed when the "
                f"run resumes here, or with `savepoints push {points.path} {points.remote}`."
            )
        _say(
            f"stopped on {what} after an emergency save point{where}; exit code "
            f"{self.exit_code}. Run the same command again to resume."
        )
        raise SystemExit(self.exit_code)

    def _leave_mark(self, run: Any, step: int | None, signal_name: str) -> None:
        """``.savepoints/preempted.json``: for whatever restarts the job (torchrun's own
        exit code is 1, whatever the workers' were)."""
        import json

        from savepoints.atomic import replace_file

        layout = RunLayout(Path(run))
        mark = {"step": step, "signal": signal_name, "exit_code": self.exit_code,
                "time": time.time()}  # fmt: skip
        try:
            replace_file(layout.preempted, json.dumps(mark).encode(), layout.staging)
        except OSError as e:
            _say(f"could not leave the preemption mark {layout.preempted}: {e}")

    def __repr__(self) -> str:
        names = ", ".join(s.name for s in self.signals)
        return f"Preemption([{names}], deadline={self.deadline}, requested={self.requested})"
