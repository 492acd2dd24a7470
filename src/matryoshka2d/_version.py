"""The package version (read by pyproject.toml and recorded in every saved folder)."""

__version__ = "0.1.0"
