"""Run benchmarks: ``python -m benchmarks`` (all) or ``python -m benchmarks graph rules``."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = sorted(
        m.name[len("bench_") :]
        for m in pkgutil.iter_modules([str(here)])
        if m.name.startswith("bench_")
    )
    chosen = argv or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {names}")
        return 2
    for name in chosen:
        t0 = time.perf_counter()
        print(f"== benchmark {name}")
        importlib.import_module(f"benchmarks.bench_{name}").main()
        print(f"== {name} done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
