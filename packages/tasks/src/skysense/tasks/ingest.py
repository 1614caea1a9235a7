"""`skysense ingest`: not implemented yet (issue #6)."""

from __future__ import annotations


def main(cfg, command: str = "ingest") -> int:
    raise NotImplementedError(f"`skysense {command}` lands with issue #6")
