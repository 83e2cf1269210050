"""Building blocks of benchmarks/make_curves.py: datasets, training runs, induced causes and acceptance checks."""
