"""SkunkQueue benchmarks: ``python -m benchmarks`` (or ``make bench``).

Runs the same workloads on every installed backend (sqlite always; redis and
mongodb when their distributions are installed, each on a server the
benchmark starts itself) and, when huey is installed, on Huey with the same
stores, then prints one table and writes the figures to a JSON file.
See ``python -m benchmarks --help``.
"""
