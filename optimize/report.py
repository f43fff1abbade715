"""The optimize job's report: a Markdown table and a fidelity-against-speed plot."""

from __future__ import annotations

from pathlib import Path

# The headline metric (plotted, and on the command's lines): the first of its task's
# the steps have (a reranker's ranking before its decisions at 0.5; a regression has
# neither label).
FIDELITY = {
    "embed": ("cosine",),
    "score": ("perplexity_increase",),
    "classify": ("spearman", "agreement", "mean_abs_diff"),
}
COLUMNS = (
    "cosine",
    "min_cosine",
    "top10",
    "perplexity",
    "perplexity_increase",
    "kl",
    "top1_agreement",
    "agreement",
    "spearman",
    "mean_abs_diff",
)


def headline(task: str, metrics: dict) -> str:
    return next(m for m in FIDELITY[task] if m in metrics)


def write_report(out: Path, task: str, results: list[dict]) -> None:
    base = results[0]["metrics"]
    shown = [c for c in COLUMNS if c in base]
    lines = [
        f"# Optimization report ({task})",
        "",
        "Each row is the model after that step, measured against the original on "
        "held-out text; rows/s is the infer job's own predictor on this machine.",
        "",
        "| step | "
        + " | ".join(shown)
        + " | parameters | MB on disk | rows/s | × original | notes |",
        "|---" * (len(shown) + 6) + "|",
    ]
    for r in results:
        m = r["metrics"]
        cells = [f"{m[c]:.4f}" for c in shown]
        lines.append(
            f"| {r['name']} | "
            + " | ".join(cells)
            + f" | {m['parameters']:,} | {m['bytes'] / 1e6:.1f} | "
            f"{m['rows_per_s']:.1f} | {m['rows_per_s'] / base['rows_per_s']:.2f} | "
            f"{'; '.join(r['notes'])} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot(out / "tradeoff.png", task, results)


def plot(path: Path, task: str, results: list[dict]) -> None:
    """One point per step, the original included: where each step put the model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = headline(task, results[0]["metrics"])
    xs = [r["metrics"]["rows_per_s"] for r in results]
    ys = [r["metrics"][metric] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(xs, ys, "-o", color="tab:blue")
    for x, y, r in zip(xs, ys, results, strict=True):
        ax.annotate(
            r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    ax.set_xlabel("rows/s (infer predictor, this machine)")
    ax.set_ylabel(metric + " vs original")
    ax.set_title("fidelity against throughput, step by step")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
