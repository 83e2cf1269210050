"""The foundation every Converge process stands on: settings, errors, logging, the heap freeze,
the version, and the database layer (`core.db`: engine and sessions, models, repositories,
Optuna's table declarations, migrate).

It imports none of `studies`, `trainers` or `service`; they all import it.
"""
