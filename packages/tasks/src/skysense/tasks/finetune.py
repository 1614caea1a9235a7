"""`skysense finetune`: not implemented yet (issue #8)."""

from __future__ import annotations


def main(cfg, command: str = "finetune") -> int:
    raise NotImplementedError(f"`skysense {command}` lands with issue #8")
