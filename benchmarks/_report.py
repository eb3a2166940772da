"""Writing one benchmark's section into BENCHMARKS.md (sections are replaced, never appended twice)."""

from __future__ import annotations

import os
import platform as _platform
import re
import time
from pathlib import Path

import psutil

from creditgraph.utils.tables import markdown_table  # noqa: F401  (re-exported for benchmarks)

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\nEvery number below is written by the benchmark script named in its section.\n"
)


def machine() -> str:
    """One line describing where the numbers were measured."""
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} cores ({_platform.processor() or _platform.machine()}), "
        f"{mem:.0f} GiB RAM, Python {_platform.python_version()}, "
        f"measured {time.strftime('%Y-%m-%d %H:%M')}"
    )


def write_section(name: str, body: str, script: str) -> Path:
    """Replace (or add) the section ``name`` of BENCHMARKS.md with ``body``."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n## {name}\n\n_Script: `{script}`; {machine()}._\n\n{body.strip()}\n{end}\n"
    text = REPORT.read_text() if REPORT.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block
    )
    tmp = REPORT.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(REPORT)
    return REPORT
