"""The ``savepoints`` command: a thin layer over the public API.

``main`` builds the group from the command modules (each defines plain click commands);
``output`` prints; ``resolve`` finds the save point a command's arguments name.
"""

from __future__ import annotations

from savepoints.cli.main import cli, main

__all__ = ["cli", "main"]
