"""Persistence: engine and sessions, Converge's ORM models, repository functions, migrate.

Part of the foundation (`converge.core`): imports nothing of `studies`, `trainers` or `service`.
"""
