"""Persistence: engine and sessions, Converge's ORM models, repository functions.

The bottom layer of `service`: imports neither the API nor `studies`.
"""
