"""Microbenchmarks on one shared harness (shipped as `pyops.bench`); run with `python -m pyops bench`."""
