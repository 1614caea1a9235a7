"""`skysense evaluate`: not implemented yet (issue #8)."""

from __future__ import annotations


def main(cfg, command: str = "evaluate") -> int:
    raise NotImplementedError(f"`skysense {command}` lands with issue #8")
