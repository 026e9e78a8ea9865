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
