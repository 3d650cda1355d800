"""audit.png: the re-scale curve, the merges (protected update vs its twin), the transforms of the update alone and
every attack per method, drawn from audit.json's content."""

import math

from .summary import attack_grid
from .verdict import verdict


def _f(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def plot(results: dict, path: str) -> None:
    """Left: the protected task along W0 + s*dW for each update alone. Right: the protected task
    after each merge, with the protected update vs with its twin. Below, with a `transforms` section: the
    update alone sparsified (by density) and at per-tensor scales (by spread). Below, with informed attacks or
    repair: per method and attack, the protected task with the protected update (colour and first
    number) and with the twin or, for repair, without the released update (second number)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = results["protected_task"]
    base, chance = results["base"][task], results["chance"][task]
    entries = [e for e in results["methods"] if e["protected"] is not None]
    grid = attack_grid(results)
    curves = (results.get("transforms") or {}).get("curves") or {}
    heights = [max(4.5, 0.28 * len(entries) + 1.5)]
    heights += [4.0] if curves else []
    heights += [] if grid is None else [0.45 * len(grid[0]) + 3.0]
    fig = plt.figure(figsize=(13, sum(heights)))
    layout = fig.add_gridspec(len(heights), 2, width_ratios=[1, 1.3], height_ratios=heights)
    left, right = fig.add_subplot(layout[0, 0]), fig.add_subplot(layout[0, 1])
    curve = results["rescale_curve"]
    left.plot(curve["scales"], curve["protected"], "o-", color="tab:red", label="protected")
    if curve.get("unprotected"):
        left.plot(curve["scales"], curve["unprotected"], "s--", color="tab:blue", label="unprotected twin")
    for ax in (left, right):
        line = ax.axhline if ax is left else ax.axvline
        line(base, color="gray", linestyle=":", label="base model")
        line(chance, color="black", linestyle="-.", linewidth=0.8, label="chance")
    left.axvline(1.0, color="gray", linewidth=0.5)
    left.set(xlabel="scale s of the update (W0 + s·ΔW)", ylabel=f"{task} metric", title="Update alone, re-scaled")
    left.set_ylim(-0.02, 1.02)
    left.legend(loc="best", fontsize=8)

    labels = [f"{e['method']} ({e['mode']})" for e in entries]
    ys = range(len(entries))
    right.barh([y - 0.2 for y in ys], [e["protected"][task] for e in entries], height=0.4, color="tab:red",
               label="merged with protected")
    twins = [e["unprotected"][task] if e.get("unprotected") else 0.0 for e in entries]
    right.barh([y + 0.2 for y in ys], twins, height=0.4, color="tab:blue", label="merged with twin")
    right.set_yticks(list(ys), labels, fontsize=7)
    right.invert_yaxis()
    right.set(xlabel=f"{task} metric after merging (test)", title="Merged with the other updates")
    right.set_xlim(0, 1.02)
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4, fontsize=8)  # below: never over a bar
    if curves:
        _plot_transforms(fig.add_subplot(layout[1, 0]), fig.add_subplot(layout[1, 1]), curves, task, (base, chance))
    if grid is not None:
        _plot_attacks(fig.add_subplot(layout[len(heights) - 1, :]), grid, task)
    judged = verdict(results)
    if not judged["given"]:
        fig.suptitle(judged["reason"], color="tab:red", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot_attacks(ax, grid, task: str) -> None:
    methods, columns, labels, by_key = grid
    values = [[_value(by_key.get((m, c)), "protected") for c in columns] for m in methods]
    image = ax.imshow(values, cmap="Reds", vmin=0.0, vmax=1.0, aspect="auto")
    for i, method in enumerate(methods):
        for j, column in enumerate(columns):
            row = by_key.get((method, column))
            if row is not None:
                other = row["reference"] if "reference" in row else row["unprotected"]
                text = f"{_f(row['protected'])}\n{_f(other)}"
                dark = row["protected"] is not None and row["protected"] > 0.6
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(len(columns)), [labels[c] for c in columns], rotation=25, ha="right", fontsize=7)
    ax.set_yticks(range(len(methods)), methods, fontsize=7)
    ax.set_title(f"{task} (test) per attack: with the protected update (top, colour) / twin or, for repair, "
                 "without the released update (bottom)", fontsize=9)
    ax.figure.colorbar(image, ax=ax, fraction=0.02, pad=0.01)


def _value(row, key):
    return math.nan if row is None or row.get(key) is None else row[key]




def _plot_transforms(sparse_ax, scale_ax, curves: dict, task: str, lines: tuple[float, float]) -> None:
    """The update alone, sparsified (x: density) and at per-tensor scales (x: spread; the worst draw solid, the mean
    dotted): protected in warm colours, the twin dashed in blue."""
    colours = {"trim": "tab:red", "dare": "tab:orange", "della": "tab:purple", "tensor_scales": "tab:red"}
    for name, curve in curves.items():
        if "points" not in curve:
            continue  # left out (its reason is in audit.json and audit.md)
        ax = scale_ax if curve["parameter"] == "spread" else sparse_ax
        ax.plot(curve["points"], curve["protected"], "o-", color=colours[name], label=f"{name}: protected")
        if curve.get("unprotected"):
            ax.plot(curve["points"], curve["unprotected"], "s--", color="tab:blue", alpha=0.6, label=f"{name}: twin")
        if curve.get("protected_mean"):
            ax.plot(curve["points"], curve["protected_mean"], "o:", color=colours[name], alpha=0.6,
                    label=f"{name}: protected, mean of {curve['draws']}")
    for ax, xlabel, title in (
        (sparse_ax, "density d (entries kept)", "Update alone, sparsified as merges do (s = 1)"),
        (scale_ax, "spread: each tensor's scale in [1 - spread, 1 + spread]", "Update alone, per-tensor scales (worst draw)"),
    ):
        ax.axhline(lines[0], color="gray", linestyle=":", label="base model")
        ax.axhline(lines[1], color="black", linestyle="-.", linewidth=0.8, label="chance")
        ax.set(xlabel=xlabel, ylabel=f"{task} metric", title=title)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="best", fontsize=7)
