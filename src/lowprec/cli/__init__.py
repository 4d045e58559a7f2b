"""The command line: ``lowprec`` / ``python -m lowprec``."""

from .main import main

__all__ = ["main"]
