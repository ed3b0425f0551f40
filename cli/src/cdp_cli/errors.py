"""The one error type the CLI shows to people as a clean one-line message."""

from __future__ import annotations


class CliError(Exception):
    """A failure the user can act on; rendered as ``error: <message>`` with exit code 1."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
