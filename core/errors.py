"""The service's own database errors: callers never see driver exceptions."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors Converge reports to users in one line."""


class DatabaseUnavailable(ServiceError):
    """The database cannot be reached (down, wrong URL, wrong credentials)."""


class DatabaseNotWritable(DatabaseUnavailable):
    """The database answers but refuses writes: a read-only file, mount or transaction, or a full disk.

    A kind of `DatabaseUnavailable` (a 503, retried like an outage): freeing space, or making the
    file writable again, lets the same work go through.
    """


class SchemaNotReady(ServiceError):
    """The database is reachable but `converge db upgrade` has not been run (or is behind)."""


class NotFound(ServiceError):
    pass


class Conflict(ServiceError):
    pass


class InvalidRequest(ServiceError):
    """A request the service cannot answer as asked (e.g. a page cursor it did not issue): a 422."""
