"""Errors the CLI reports as one line (no traceback unless --debug)."""
from __future__ import annotations


class UserError(Exception):
    """Bad input or an impossible request: the message names the cause."""


class SpecError(UserError):
    """A job-spec problem, always tied to a key path."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


class JobError(UserError):
    """A job that cannot be found, resumed or stopped as asked."""
