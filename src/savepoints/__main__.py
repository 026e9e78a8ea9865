"""``python -m savepoints``: the same as the ``savepoints`` command."""

from savepoints.cli import main

main()
