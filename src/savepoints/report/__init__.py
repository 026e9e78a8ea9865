"""``savepoints report``: a run at a glance, as one self-contained HTML file.

Curves of everything the run logged with every save point marked on them (kept, deleted
by retention, best, tagged, preempted) and resumes shown as breaks; a table of the save
points; storage over time; a per-layer heatmap of what changed between save points; the
processes that wrote the run, its settings and versions. From the run journal
(journal.py) and the manifests; read-only, safe while the run trains.

The charts are SVG written here (svg.py), not a plotting library: a report of a few
dozen KB that opens offline, mails, prints, and needs no CDN (plotly's bundle alone is
3.5 MB; Vega-Lite needs three scripts and a runtime).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from savepoints.atomic import replace_file
from savepoints.report.data import Progress, RunData, gather, report_path
from savepoints.report.page import render, render_comparison

__all__ = ["LiveReport", "RunData", "gather", "report_path", "write_comparison", "write_report"]

log = logging.getLogger("savepoints")


def write_report(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    verify: bool = True,
    heatmap: bool = True,
    refresh: float | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write the report of ``run`` to ``out`` (default ``RUN/report.html``) atomically (a
    browser reloading it never reads half a page) and return its path. ``verify``
    re-hashes every save point for the table; ``refresh`` (seconds) makes the page reload
    itself, for a report rewritten while the run trains."""
    target = Path(out) if out is not None else report_path(run)
    data = gather(run, verify=verify, heatmap=heatmap, progress=progress)
    _write(target, render(data, target, refresh=refresh))
    return target


def write_comparison(
    run_a: str | os.PathLike[str],
    run_b: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
) -> Path:
    """Write a page with two runs' curves on the same axes; return its path."""
    target = Path(out)
    a = gather(run_a, verify=False, heatmap=False, progress=progress)
    b = gather(run_b, verify=False, heatmap=False, progress=progress)
    _write(target, render_comparison(a, b, target))
    return target


def _write(target: Path, text: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    replace_file(target, text.encode(), target.parent)


class LiveReport:
    """Rewrites a run's report after each commit while it trains, as a page that reloads
    itself every ``every`` seconds. Use it as a commit listener
    (``points.on_commit(LiveReport(run))``): the page is written in a thread of its own,
    so a slow report never holds up a save, and commits that land while it writes are
    folded into the next page. ``close()`` stops it (the caller then writes the final
    report)."""

    def __init__(
        self, run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
        every: float = 10.0,
    ) -> None:  # fmt: skip
        self.run = Path(run)
        self.out = Path(out) if out is not None else report_path(run)
        self.every = every
        self.written = 0
        self._wanted = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="savepoints-report", daemon=True)
        self._thread.start()

    def __call__(self, step: int) -> None:
        self._wanted.set()

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stopped:
                return
            try:
                write_report(self.run, self.out, verify=False, refresh=self.every)
                self.written += 1
            except Exception as e:  # a report must never stop training: said, then retried
                log.warning("savepoints: could not refresh the report %s: %s", self.out, e)

    def close(self, *, settle: bool = False) -> None:
        """Let the page being written finish, then stop. ``settle``: write one last page
        that no longer reloads (quickly: nothing re-hashed, no layers compared), for a run
        that stops before its final report (interrupted, preempted)."""
        self._stopped = True
        self._wanted.set()
        self._thread.join()
        if settle:
            try:
                write_report(self.run, self.out, verify=False, heatmap=False)
            except Exception as e:
                log.warning("savepoints: could not write the report %s: %s", self.out, e)
