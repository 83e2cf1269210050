"""Converge's own errors, one place for every process: input with problems (`Invalid`) and the
service's database errors (callers never see driver exceptions).

Pure Python, no imports: the diagnosis, which is numpy only, raises `Invalid` too.
"""

from __future__ import annotations


class Invalid(ValueError):
    """Input Converge cannot take as given; `problems` lists every reason ('where: what is wrong').

    Mapped once per entry point: the API answers 422 with the list (`service.api.app`), the CLI
    prints it and exits 2 (`service.cli.ConvergeGroup`). `what` names the input ("study spec",
    "history", "schedule"); `source`, when set, names where it came from (a file) and leads the message.
    """

    what = "input"
    one_line = False  # the message as one line ("invalid history: a; b"), e.g. for a --jsonl row

    def __init__(self, problems: list[str], what: str | None = None, *, source: str | None = None):
        self.problems = list(problems)
        if what is not None:
            self.what = what
        self.source = source
        super().__init__(self.problems, self.what)  # what pickling needs to build it again

    def listing(self) -> str:
        """Every problem on its own line, after a count: the API's `detail`."""
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        return f"invalid {self.what} ({count}):\n" + "\n".join(f"  - {p}" for p in self.problems)

    def __str__(self) -> str:
        text = f"invalid {self.what}: " + "; ".join(self.problems) if self.one_line else self.listing()
        return f"{self.source}: {text}" if self.source else text


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
