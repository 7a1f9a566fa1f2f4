"""Draw a search's Pareto front: model time against model error, one point per plan."""

from __future__ import annotations

from pathlib import Path

from attnopt.errors import AttnoptError


def plot_pareto(pareto: list[dict], path: str | Path, title: str = "") -> Path:
    """Write the front (``Report.pareto``) as an image (the format from the suffix)."""
    if not pareto:
        raise AttnoptError("the report has no Pareto front; run optimize(..., search=True)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise AttnoptError("plotting needs matplotlib: pip install 'attnopt[plot]'") from err
    points = sorted(pareto, key=lambda p: p["ms"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["ms"] for p in points], [p["model_rel_l1"] for p in points], "o-")
    for p in points:
        ax.annotate(str(p["trial"]), (p["ms"], p["model_rel_l1"]), fontsize=7)
    ax.set_xlabel("model time (ms)")
    ax.set_ylabel("model output rel_l1")
    ax.set_title(title or "attnopt search: Pareto front")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
