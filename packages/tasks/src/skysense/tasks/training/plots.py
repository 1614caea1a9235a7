"""Loss curves of a run as a PNG a person can read."""

from __future__ import annotations

from pathlib import Path


def plot_losses(history: list[dict], path: Path, title: str = "SkySense pre-training") -> Path:
    """One panel with the total loss, one with every term, one with the learning rate.

    ``history``: one dict per logged step with ``step``, ``loss``, ``lr`` and ``terms`` (name ->
    float).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    axes[0].plot(steps, [h["loss"] for h in history], color="black")
    axes[0].set_title("total loss")
    names = sorted({k for h in history for k in h.get("terms", {})})
    for n in names:
        axes[1].plot(steps, [h["terms"].get(n, float("nan")) for h in history], label=n, lw=1)
    axes[1].set_title("loss terms")
    if names:
        axes[1].legend(fontsize=6, ncol=2)
    axes[2].plot(steps, [h["lr"] for h in history], color="tab:green")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
