"""`skysense infer`: not implemented yet (issue #8)."""

from __future__ import annotations


def main(cfg, command: str = "infer") -> int:
    raise NotImplementedError(f"`skysense {command}` lands with issue #8")
