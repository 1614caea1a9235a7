"""`skysense finetune task=... [data=...] [checkpoint=...]`: fine-tune SkySense on a downstream
task (classification, multi-label, segmentation, change detection, detection, multi-modal and
time-series tasks), evaluate it on held-out data, and write the fine-tuned model, metrics JSON
and plots. See :mod:`skysense.tasks.downstream.run`."""

from __future__ import annotations


def main(cfg, command: str = "finetune") -> int:
    from skysense.tasks.downstream.errors import as_config_errors
    from skysense.tasks.downstream.run import finetune

    with as_config_errors("finetune"):
        finetune(cfg)
    return 0
