"""Errors of the tasks package that the command line turns into clear messages."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config field (or command-line argument) is wrong. ``field`` names it, dotted."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
