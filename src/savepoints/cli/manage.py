"""``savepoints tag``, ``untag`` and ``rm``: the writing commands for a run's versions."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from savepoints.cli import cli
from savepoints.manager import SavePoints

console = Console(highlight=False)


def _step_or_tag(value: str) -> int | str:
    return int(value) if value.isdigit() else value


@cli.command("tag")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("step")
@click.argument("name")
def tag_cmd(run: Path, step: str, name: str) -> None:
    """Tag save point STEP of RUN as NAME. Tagged save points are never deleted by
    retention, and NAME can be used wherever a step is expected."""
    with SavePoints(run) as points:
        point = points.tag(_step_or_tag(step), name)
    console.print(f"[green]✓[/] step {point.step} tagged {name!r}: {', '.join(point.tags)}")


@cli.command("untag")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("step")
@click.argument("name")
def untag_cmd(run: Path, step: str, name: str) -> None:
    """Remove tag NAME from save point STEP of RUN (retention may then delete it)."""
    with SavePoints(run) as points:
        point = points.untag(_step_or_tag(step), name)
    console.print(f"[green]✓[/] removed tag {name!r} from step {point.step}")


@cli.command("rm")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("steps", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Also remove tagged save points.")
def rm_cmd(run: Path, steps: tuple[str, ...], force: bool) -> None:
    """Delete save points STEPS (numbers or tags) of RUN. Each disappears atomically;
    no other save point is affected."""
    with SavePoints(run) as points:
        targets = [points.get(_step_or_tag(s)) for s in steps]  # all found before any goes
        tagged = [p for p in targets if p.tags]
        if tagged and not force:
            from savepoints.errors import InvalidArgumentError

            raise InvalidArgumentError(
                "Step(s) "
                + ", ".join(f"{p.step} ({', '.join(p.tags)})" for p in tagged)
                + " are tagged; nothing was deleted.",
                "Untag them first, or pass --force.",
            )
        for p in targets:
            points.delete(p.step)
            console.print(f"[green]✓[/] deleted step {p.step}")


@cli.command("du")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def du_cmd(run: Path, as_json: bool) -> None:
    """Disk usage of RUN: logical bytes (every save point as a full copy), physical bytes
    (what is really on disk), each save point's unique bytes, and the dedup ratio."""
    import json

    from rich import box
    from rich.table import Table

    from savepoints.cli.inspect import human_bytes

    points = SavePoints(run, readonly=True)
    u = points.usage()
    if as_json:
        click.echo(json.dumps({"logical": u.logical, "physical": u.physical, "ratio": u.ratio,
                               "garbage": u.garbage, "unique": u.unique}, indent=2))  # fmt: skip
        return
    table = Table(title=f"{run}", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("step", justify="right")
    table.add_column("size", justify="right")
    table.add_column("unique", justify="right")
    sizes = {p.step: p.size for p in points.list()}
    for step, unique in sorted(u.unique.items()):
        table.add_row(str(step), human_bytes(sizes[step]), human_bytes(unique))
    console.print(table)
    console.print(
        f"logical {human_bytes(u.logical)}  physical {human_bytes(u.physical)}  "
        f"dedup ratio {u.ratio:.2f}x"
        + (f"  garbage {human_bytes(u.garbage)} (savepoints gc frees it)" if u.garbage else "")
    )


@cli.command("gc")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
def gc_cmd(run: Path) -> None:
    """Free stored file contents that no save point of RUN references any more.
    Safe to interrupt: it only ever removes unreferenced data."""
    from savepoints.cli.inspect import human_bytes

    with SavePoints(run) as points:
        blobs, freed = points.gc()
    console.print(f"[green]✓[/] freed {human_bytes(freed)} in {blobs} unreferenced blob(s)")


def _compact(run: Path, steps: tuple[str, ...], expand: bool) -> None:
    from savepoints.cli.inspect import human_bytes

    with SavePoints(run) as points:
        for s in steps:
            before = points.get(_step_or_tag(s)).size
            after = points.compact(_step_or_tag(s), expand=expand)
            verb = "expanded" if expand else "compacted"
            console.print(
                f"[green]✓[/] {verb} step {after.step}: {human_bytes(before)} → "
                f"{human_bytes(after.size)} ({before / max(after.size, 1):.2f}x)"
            )


@cli.command("compact")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("steps", nargs=-1, required=True)
def compact_cmd(run: Path, steps: tuple[str, ...]) -> None:
    """Compress save points STEPS of RUN losslessly (byte grouping + zstd) for keeping.
    `restore()` reads them as they are; `expand` makes them loadable by from_pretrained."""
    _compact(run, steps, expand=False)


@cli.command("expand")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("steps", nargs=-1, required=True)
def expand_cmd(run: Path, steps: tuple[str, ...]) -> None:
    """Rebuild compacted save points STEPS of RUN into plain, byte-identical files."""
    _compact(run, steps, expand=True)
