"""The base error of every room: a message for a person and a stable `code` for a program."""

from __future__ import annotations


class SovereignError(Exception):
    """An error we expect and explain; `code` is stable, the message says what to fix."""

    code: str = "sovereign_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(SovereignError):
    code = "invalid_config"
