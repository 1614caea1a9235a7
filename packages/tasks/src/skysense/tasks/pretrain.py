"""`skysense pretrain`: not implemented yet (issue #7)."""

from __future__ import annotations


def main(cfg, command: str = "pretrain") -> int:
    raise NotImplementedError(f"`skysense {command}` lands with issue #7")
