"""``savepoints list``, ``show``, ``verify`` and ``diff``: read-only views of a run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click
from rich.padding import Padding
from rich.table import Table
from rich.tree import Tree

from savepoints import (
    InvalidArgumentError,
    SavePoint,
    SavePoints,
    SavePointsError,
    VerifyReport,
    verify,
)
from savepoints.cli.output import (
    console,
    echo_json,
    esc,
    fmt_metric,
    human_bytes,
    json_option,
    spinner,
    table,
    when,
)
from savepoints.cli.remote import (
    is_remote,
    remote_best,
    remote_point,
    remote_points,
    remote_verify,
)
from savepoints.cli.resolve import KEYWORDS, is_point_folder, open_run, pick, resolve
from savepoints.diff import ModelView, diff_models
from savepoints.layout import parse_step
from savepoints.lineage import lineage_rows


def _best_step(points: SavePoints, listed: list[SavePoint], metric: str | None) -> int | None:
    try:
        best = points.best(metric=metric)
    except SavePointsError:
        return None
    return best.step if best and best in listed else None


def point_summary(sp: SavePoint, latest: bool = False, best: bool = False) -> dict[str, Any]:
    return {
        "step": sp.step,
        "path": f"{sp.remote}/points/{sp.path}" if sp.remote else str(sp.path),
        "created": sp.created.isoformat(),
        "metrics": sp.metrics,
        "tags": list(sp.tags),
        "preempted": sp.preempted,
        "size": sp.size,
        "latest": latest,
        "best": best,
    }


@click.command("list")
@click.argument("run", type=click.Path(path_type=str))
@click.option("--metric", help="Metric that defines the best save point (default: the run's).")
@json_option("Print JSON instead of a table.")
def list_cmd(run: str, metric: str | None, as_json: bool) -> None:
    """List the committed save points of RUN (a folder, or a remote URL such as
    s3://bucket/prefix): step, time, metrics, size, tags."""
    if is_remote(run):
        _, listed = remote_points(run)
        best = remote_best(listed, metric)
    else:
        points = open_run(Path(run))
        listed = points.list()
        best = _best_step(points, listed, metric)
    latest = listed[-1].step if listed else None
    if as_json:
        echo_json([point_summary(p, p.step == latest, p.step == best) for p in listed])
        return
    print_table(run, listed, latest, best)


def print_points_table(run: Path, metric: str | None = None) -> None:
    """The ``savepoints list`` table, for other commands to end with."""
    points = open_run(run)
    listed = points.list()
    print_table(
        run, listed, listed[-1].step if listed else None, _best_step(points, listed, metric)
    )


def print_table(
    run: Path | str, listed: list[SavePoint], latest: int | None, best: int | None
) -> None:
    if not listed:
        console.print(f"No committed save points in {esc(str(run))}.")
        return
    metric_names: list[str] = []
    for p in listed:
        metric_names.extend(m for m in p.metrics if m not in metric_names)
    columns: list[tuple[str, str]] = [("step", "right"), ("created", "left")]
    columns += [(m, "right") for m in metric_names]
    columns += [("size", "right"), ("tags", "left"), ("", "left")]
    rows = []
    for p in listed:
        marks = " ".join(
            mark
            for mark, on in (
                ("latest", p.step == latest),
                ("★ best", p.step == best),
                (f"⚡ preempted ({p.preempted})", p.preempted is not None),
            )
            if on
        )
        rows.append(
            [
                str(p.step),
                when(p.created, short=True),
                *[fmt_metric(p.metrics[m]) if m in p.metrics else "" for m in metric_names],
                human_bytes(p.size),
                ", ".join(p.tags),
                marks,
            ]
        )
    # Columns that say nothing are left out, and "created" goes first when the table
    # would not fit: cut-off metric names and values would be worse.
    keep = [
        i for i, (name, _) in enumerate(columns) if name in ("step", "") or any(r[i] for r in rows)
    ]
    widths = {i: max(len(columns[i][0]), *(len(r[i]) for r in rows)) + 3 for i in keep}
    if sum(widths.values()) > console.width and 1 in keep:
        keep.remove(1)
    t = table(f"{run}  ({len(listed)} save points)")
    for i in keep:
        name, justify = columns[i]
        t.add_column(esc(name), justify=justify, no_wrap=True, style="bold" if i == 0 else None)  # type: ignore[arg-type]
    for r in rows:
        styled = [
            r[i].replace("latest", "[cyan]latest[/]").replace("★ best", "[green]★ best[/]")
            if i == len(columns) - 1
            else r[i]
            for i in keep
        ]
        t.add_row(*styled)
    console.print(t)


def describe_component(name: str, info: object) -> str:
    """One line for an entry of a manifest's ``contents``: most are objects (class, files,
    kind...), some plain lists of file names (extra files a Trainer wrote, say)."""
    if isinstance(info, list):
        return ", ".join(map(str, info))
    if not isinstance(info, dict):
        return str(info)
    if name == "ranks":
        written = info.get("written", [])
        share = ", ".join(f"rank {r}: {len(w.get('files', []))}" for r, w in enumerate(written))
        return f"written by {info.get('world_size')} ranks (files {share})"
    listed: list[Any] = next(
        (info[k] for k in ("generators", "files") if isinstance(info.get(k), list)), []
    )
    desc = str(info.get("class") or "") or ", ".join(map(str, listed or info))
    if name == "model":
        tied = info.get("tied")
        desc += f"  ({info.get('kind')}, {info.get('tensors')} tensors"
        desc += f", {len(tied)} tied)" if isinstance(tied, (list, dict)) and tied else ")"
    return desc


@click.command("show")
@click.argument("run", type=click.Path(path_type=str))
@click.argument("step", required=False)
@json_option("Print the manifest as JSON.")
def show_cmd(run: str, step: str | None, as_json: bool) -> None:
    """Show one save point of RUN (a folder or a remote URL; default the latest; STEP may
    be a number, a tag, 'latest' or 'best'), or a save point FOLDER: files, sizes,
    metrics, state, lineage (code commit, data, command, host, the chain of save points
    across resumes), versions."""
    sp = remote_point(run, step) if is_remote(run) else resolve(Path(run), step)
    if as_json:
        echo_json({"path": point_summary(sp)["path"], **sp.manifest.to_json()})
        return
    m = sp.manifest
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("save point", f"step {sp.step}")
    head.add_row("path", esc(point_summary(sp)["path"]))
    head.add_row("created", when(sp.created))
    head.add_row("parent", "—" if sp.parent is None else f"step {sp.parent}")
    head.add_row("size", f"{human_bytes(sp.size)} in {len(m.files)} files")
    head.add_row("tags", ", ".join(sp.tags) or "—")
    console.print(head)
    if sp.metrics:
        mt = table("metrics", "metric", ("value", "right"))
        for k, v in sp.metrics.items():
            mt.add_row(esc(k), fmt_metric(v))
        console.print(mt)
    if sp.state:
        console.print("[bold]state[/]")
        console.print_json(json.dumps(sp.state))
    tree = Tree("[bold]contents[/]")
    for name, info in m.contents.items():
        tree.add(esc(f"{name}: {describe_component(name, info)}"))
    console.print(tree)
    ft = table("files", "file", ("size", "right"), m.hash_algorithm)
    for rel, e in sorted(m.files.items()):
        ft.add_row(esc(rel), human_bytes(e.size), f"[dim]{e.hash[:16]}[/]")
    console.print(ft)
    lineage = Table.grid(padding=(0, 2))
    lineage.add_column(style="bold")
    lineage.add_column()
    for label, text in lineage_rows(m.lineage, size=human_bytes):
        lineage.add_row(esc(label), esc(text))
    console.print("[bold]lineage[/]")
    console.print(Padding(lineage, (0, 0, 0, 2)))
    console.print(
        "[bold]versions[/]  " + "  ".join(f"{k} {v}" for k, v in sorted(m.versions.items()))
    )


def _report_json(r: VerifyReport, signatures: dict[str, Any] | None = None) -> dict[str, Any]:
    """A verify report as JSON; with ``signatures`` (verify --key), each save point's
    signature check too, and ``ok`` only when it passed."""
    signatures = signatures or {}
    sig = signatures.get(str(r.path))
    children = [_report_json(c, signatures) for c in r.children]
    ok = r.ok and (sig is None or sig["ok"]) and all(c["ok"] for c in children)
    return {
        "path": str(r.path),
        "ok": ok,
        "files_checked": r.files_checked,
        "bytes_checked": r.bytes_checked,
        "problems": [{"kind": p.kind, "file": p.path, "detail": p.detail} for p in r.problems],
        **({"signature": sig} if sig is not None else {}),
        **({"save_points": children} if children else {}),
    }


@click.command("verify")
@click.argument("target", metavar="PATH", type=click.Path(path_type=str))
@click.argument("step", required=False)
@click.option("--key", "keys", multiple=True, type=click.Path(path_type=Path),
              help="Also check the signature (savepoints sign) with this public key (PEM); "
              "repeat for several trusted signers.")  # fmt: skip
@json_option("Print the report as JSON.")
def verify_cmd(target: str, step: str | None, keys: tuple[Path, ...], as_json: bool) -> None:
    """Re-hash every file of a run's save points, of one of them (STEP: a number, a tag,
    'latest' or 'best'), or of one save point FOLDER. PATH may be a remote URL
    (s3://bucket/prefix...): its files are downloaded and hashed, nothing is written.
    With --key, each one's signature is checked too; PATH may then also be an exported
    folder or ONNX bundle.

    Exit status 0 only when everything verifies, 3 when anything is missing, extra,
    truncated or altered, or (with --key) unsigned or not signed by a trusted key.
    """
    if keys and is_remote(target):
        raise InvalidArgumentError(
            "Signatures are checked on local folders; --key does not apply to a remote URL.",
            f"Pull it first (savepoints pull {target} RUN), then verify RUN --key ...",
        )
    if is_remote(target):
        with spinner(f"downloading and verifying {target} ..."):
            children = remote_verify(target, step)
        report = VerifyReport(path=target, children=children)
        one_point = False
    else:
        path = Path(target)
        if step is not None:
            path = resolve(path, step).path
        # A folder named like a save point is verified as one even without its manifest:
        # an uncommitted or damaged save point is what verify is there to report.
        one_point = is_point_folder(path) or parse_step(path.name) is not None
        if keys and not one_point and not (path / ".savepoints").is_dir() and path.is_dir():
            return _verify_folder_signature(path, keys, as_json)
        with spinner(f"verifying {path} ..."):
            report = verify(path)
    signatures = _check_signatures([report] if one_point else report.children, keys)
    if as_json:
        echo_json(_report_json(report, signatures))
    else:
        reports = [report] if one_point else report.children
        if not reports:
            console.print(f"No save point folders in {esc(target)}.")
        for r in reports:
            status = "[green]OK[/]" if r.ok else "[bold red]FAILED[/]"
            size = human_bytes(r.bytes_checked)
            console.print(f"{status}  {esc(str(r.path))}  ({r.files_checked} files, {size})")
            for p in r.problems:
                console.print(f"    [red]{p.kind:9}[/] {esc(f'{p.path}: {p.detail}')}")
            if keys:
                _print_signature(signatures[str(r.path)])
        bad = sum(1 for r in reports if not r.ok or not signatures.get(str(r.path), _OK)["ok"])
        if reports:
            what = "verified and signed by a trusted key" if keys else "verified"
            summary = (
                f"[green]all {len(reports)} save point(s) {what}[/]"
                if not bad
                else f"[bold red]{bad} of {len(reports)} save point(s) failed verification[/]"
            )
            console.print(summary)
    if not report.ok or not all(s["ok"] for s in signatures.values()):
        sys.exit(3)


_OK: dict[str, Any] = {"ok": True}


def _check_signatures(reports: list[VerifyReport], keys: tuple[Path, ...]) -> dict[str, Any]:
    """Each save point's signature checked with ``keys`` (nothing without keys): by path,
    ``{"ok", "key", "key_id", "files"}`` or ``{"ok": False, "error", "hint"}``."""
    if not keys:
        return {}
    from savepoints.interop.signing import load_trusted_keys

    trusted = load_trusted_keys(keys)  # a bad key file fails once, before any hashing
    return {str(r.path): _signature_of(Path(r.path), trusted) for r in reports}


def _signature_of(folder: Path, keys: Any) -> dict[str, Any]:
    from savepoints.errors import KeyFileError, SigningError
    from savepoints.interop.signing import verify_signature

    try:
        with spinner(f"checking the signature of {folder} ..."):
            sig = verify_signature(folder, keys)
    except KeyFileError:
        raise
    except SigningError as e:
        return {"ok": False, "error": e.message, "hint": e.hint}
    return {"ok": True, "key": str(sig.key), "key_id": sig.key_id, "files": sig.files_covered}


def _print_signature(sig: dict[str, Any]) -> None:
    if sig["ok"]:
        console.print(f"    [green]signed[/]    by {esc(sig['key'])} (key {sig['key_id'][:16]}), "
                      f"{sig['files']} files covered")  # fmt: skip
    else:
        console.print(f"    [red]signature[/] {esc(sig['error'])}")
        console.print(f"              [dim]{esc(sig['hint'])}[/]")


def _verify_folder_signature(path: Path, keys: tuple[Path, ...], as_json: bool) -> None:
    """``verify FOLDER --key``: an exported folder or ONNX bundle (no manifest): its
    signature, and for a bundle the hashes the export recorded."""
    from savepoints.interop.onnx_bundle import OnnxBundle, is_bundle
    from savepoints.interop.signing import load_trusted_keys

    problems = [str(p) for p in OnnxBundle(path).verify()] if is_bundle(path) else []
    sig = _signature_of(path, load_trusted_keys(keys))
    if as_json:
        echo_json({"path": str(path), "ok": not problems and sig["ok"], "problems": problems,
                   "signature": sig})  # fmt: skip
    else:
        status = "[green]OK[/]" if not problems and sig["ok"] else "[bold red]FAILED[/]"
        console.print(f"{status}  {esc(str(path))}")
        for p in problems:
            console.print(f"    [red]altered[/]   {esc(p)}")
        _print_signature(sig)
    if problems or not sig["ok"]:
        sys.exit(3)


def _bar(value: float, top: float, width: int = 24) -> str:
    if top <= 0 or not math.isfinite(value):
        return ""
    return "█" * max(1, round(width * min(value, top) / top)) if value > 0 else ""


def _is_folder_ref(ref: str) -> bool:
    return ref not in KEYWORDS and not ref.isdigit() and Path(ref).is_dir()


def _point_view(point: SavePoint) -> ModelView:
    label = f"step {point.step}" + (f" ({', '.join(point.tags)})" if point.tags else "")
    return ModelView.open(point.path, label)


@click.command("diff")
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("a")
@click.argument("b")
@click.option(
    "--top", type=click.IntRange(min=1), default=15, show_default=True,
    help="Changed tensors to list.",
)  # fmt: skip
@json_option("Print the whole comparison as JSON.")
def diff_cmd(run: Path, a: str, b: str, top: int, as_json: bool) -> None:
    """What changed from A to B (steps, tags, 'latest' or 'best' of RUN, or folders):
    config, tensors (relative L2 change per tensor and per layer), metrics."""
    # A ref that is a folder (a save point's, or any model folder) is compared as it is;
    # the run is opened only for the others.
    points = None if all(map(_is_folder_ref, (a, b))) else open_run(run)
    a_view, b_view = (
        ModelView.open(Path(ref), ref) if points is None or _is_folder_ref(ref)
        else _point_view(pick(points, ref))
        for ref in (a, b)
    )  # fmt: skip
    report = diff_models(a_view, b_view)
    if as_json:
        echo_json(report.to_json())
        return
    console.print(f"[bold]{esc(report.a)}[/] → [bold]{esc(report.b)}[/]")
    if report.metric_changes:
        t = table("metrics", "metric", ("A", "right"), ("B", "right"), ("Δ", "right"))
        for k, (va, vb) in report.metric_changes.items():
            d = "" if va is None or vb is None else f"{vb - va:+.4g}"
            t.add_row(esc(k), *("—" if v is None else f"{v:.4g}" for v in (va, vb)), d)
        console.print(t)
    if report.config_changes:
        t = table("config", "key", "A", "B")
        for k, (va, vb) in report.config_changes.items():
            t.add_row(esc(k), esc(json.dumps(va)), esc(json.dumps(vb)))
        console.print(t)
    for label, names in (("added", report.added), ("removed", report.removed)):
        if names:
            console.print(f"[bold]{label}[/] ({len(names)}): " + esc(", ".join(names[:top])))
    for name, (sa, sb) in report.reshaped.items():
        console.print(f"[bold]reshaped[/] {esc(name)}: {sa} → {sb}")
    if report.layers:
        t = table("relative L2 change per layer", "layer", ("change", "right"), "")
        top_layer = max((v for v in report.layers.values() if math.isfinite(v)), default=0.0)
        for layer, v in sorted(report.layers.items(), key=lambda kv: -kv[1])[:top]:
            t.add_row(esc(layer), f"{v:.3e}" if v else "0", _bar(v, top_layer))
        console.print(t)
    if report.changed:
        shown = min(top, len(report.changed))
        t = table(
            f"most changed tensors (top {shown} of {len(report.changed)})",
            "tensor", ("relative L2", "right"), ("params", "right"),
        )  # fmt: skip
        for c in report.changed[:top]:
            t.add_row(esc(c.name), f"{c.relative_l2:.3e}", f"{c.numel:,}")
        console.print(t)
    console.print(
        f"{report.unchanged} tensor(s) unchanged ({human_bytes(report.unchanged_bytes)}), "
        f"{len(report.changed)} changed."
    )
