"""`skysense evaluate task=... [data=...] [weights=...]`: evaluate a fine-tuned model file on
the held-out data of a task, writing metrics JSON and plots. See
:mod:`skysense.tasks.downstream.run`."""

from __future__ import annotations


def main(cfg, command: str = "evaluate") -> int:
    from skysense.tasks.downstream.errors import as_config_errors
    from skysense.tasks.downstream.run import evaluate

    with as_config_errors("evaluate"):
        evaluate(cfg)
    return 0
