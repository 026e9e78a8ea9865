"""The version of savepoints (also in pyproject.toml; recorded in every manifest)."""

__version__ = "0.2.0"
