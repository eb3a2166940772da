"""Benchmarks: each ``bench_<name>.py`` measures one claim and writes its section of BENCHMARKS.md."""
