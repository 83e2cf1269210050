"""A module an operator might allow that merely imports dangerous callables from elsewhere:
tests/test_security.py shows that naming them through it is refused (they are not defined here)."""

from os import system  # noqa: F401 - re-exported on purpose
from subprocess import getoutput  # noqa: F401 - re-exported on purpose


def build_model(**_: object) -> None:
    """Defined here, so allowed by the policy; never reached in the tests (the data factory is refused)."""
