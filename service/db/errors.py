"""The service's own database errors: callers never see driver exceptions."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors Converge reports to users in one line."""


class DatabaseUnavailable(ServiceError):
    """The database cannot be reached (down, wrong URL, wrong credentials)."""


class SchemaNotReady(ServiceError):
    """The database is reachable but `converge db upgrade` has not been run (or is behind)."""


class NotFound(ServiceError):
    pass


class Conflict(ServiceError):
    pass


class InvalidRequest(ServiceError):
    """A request the service cannot answer as asked (e.g. a page cursor it did not issue): a 422."""
