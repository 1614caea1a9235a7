"""`skysense bench`: not implemented yet (issue #9)."""

from __future__ import annotations


def main(cfg, command: str = "bench") -> int:
    raise NotImplementedError(f"`skysense {command}` lands with issue #9")
