"""Logging that says what happened: one rich handler on the package logger."""

from __future__ import annotations

import logging
import os

_CONFIGURED = False


def get_logger(name: str) -> logging.Logger:
    """Return a logger under the ``creditgraph`` namespace, configuring the root handler once."""
    global _CONFIGURED
    if not _CONFIGURED:
        from rich.logging import RichHandler

        root = logging.getLogger("creditgraph")
        if not root.handlers:
            handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
            handler.setFormatter(logging.Formatter("%(message)s"))
            root.addHandler(handler)
        root.setLevel(os.environ.get("CREDITGRAPH_LOG", "INFO").upper())
        root.propagate = False
        _CONFIGURED = True
    if not name.startswith("creditgraph"):
        name = f"creditgraph.{name}"
    return logging.getLogger(name)
