"""Benchmarks (``python -m bench.<name>``) and, under ``bench/studies``, the studies that chose the
defaults (``python -m bench.studies.<name>``), run from the repository root. Each prints a table and
writes its numbers with the machine it ran on to bench/results (indexed in bench/results/INDEX.md)."""
