"""Benchmarks: `python -m histodist.bench <suite> [options]`. Each suite is a module with main(argv)."""
