"""`skysense summary`: not implemented yet (issue #4)."""

from __future__ import annotations


def main(cfg, command: str = "summary") -> int:
    raise NotImplementedError(f"`skysense {command}` lands with issue #4")
