"""The `archc` command line. Nothing in archc imports this package."""

from archc.cli.main import main

__all__ = ["main"]
