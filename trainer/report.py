"""What a person reads after a run: the summary table and the PNG plots.

- `print_summary(run_dir)`: stage timings, label balance, fit quality, loss first/last, probe shifts.
- `write_plots(run_dir, out_dir)`: `pca_queries.png` (training queries in the first two PCA
  dimensions with no prompt, with the human prompt, and with the trained soft prompt; the refusal
  direction drawn as the paper's figures draw it, the arrow −w_r from the PCA origin) and
  `loss_curves.png`.
Reads run-directory files only; no training maths (the PCA coordinates are `trainer.geometry`'s projection).
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from trainer import store


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_rows(run_dir: Path) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for stage in ("label", "extract", "fit", "optimize", "export"):
        rows.append((f"{stage} seconds", _fmt(store.stage_seconds(run_dir, stage))))
    balance_path = run_dir / "balance.json"
    if balance_path.is_file():
        balance = store.read_json(balance_path)
        rows += [("refusal rate (all states)", f"{balance['refusal_rate']:.1%}"),
                 ("refusal rate harmful / harmless",
                  f"{balance['harmful_refusal_rate']:.1%} / {balance['harmless_refusal_rate']:.1%}"),
                 ("balance checks failed", str(len(balance["failed_checks"]))),
                 ("forced", str(balance["forced"]))]
    if (run_dir / "fit.json").is_file():
        fit = store.read_json(run_dir / "fit.json")
        health = fit.get("health", {})
        rows += [("PCA explained variance (k)", ", ".join(f"{v:.3f}" for v in fit["explained_variance_ratio"])),
                 ("refusal / harmfulness probe acc.",
                  f"{fit['refusal_accuracy']:.3f} / {fit['harmfulness_accuracy']:.3f}"),
                 ("majority baselines (refusal / harmf.)",
                  f"{_fmt(health.get('refusal_majority_baseline'))} / {_fmt(health.get('harmfulness_majority_baseline'))}"),
                 ("|w_r| / |w_h|", f"{fit['refusal_weight_norm']:.4f} / {fit['harmfulness_weight_norm']:.4f}")]
    if (run_dir / "optimize.json").is_file():
        optimize = store.read_json(run_dir / "optimize.json")
        first, last = optimize["history"][0], optimize["history"][-1]
        rows += [("soft prompt", f"{optimize['num_virtual_tokens']} tokens from '{optimize['init_prompt']}'"),
                 ("steps", str(len(optimize["history"]))),
                 ("loss first -> last", f"{first['loss']:.4f} -> {last['loss']:.4f}"),
                 ("L_r first -> last", f"{first['refusal']:.4f} -> {last['refusal']:.4f}"),
                 ("L_U first -> last", f"{first['off_subspace']:.4g} -> {last['off_subspace']:.4g}")]
        for name, value in optimize["score_shift"].items():
            rows.append((name.replace("_", " "), f"{value:+.4f}"))
        health = optimize.get("health", {})
        for label in ("harmful", "harmless"):
            if f"{label}_words_init" in health:
                rows.append((f"{label} answer words init -> trained",
                             f"{health[f'{label}_words_init']:.0f} -> {health[f'{label}_words_trained']:.0f} "
                             f"(finished {health[f'{label}_finished_init']:.0%} -> "
                             f"{health[f'{label}_finished_trained']:.0%})"))
    return rows


def health_warnings(run_dir: Path) -> list[str]:
    """Every warning the fit and optimize stages recorded (trainer.health), in stage order."""
    warnings: list[str] = []
    for name in ("fit.json", "optimize.json"):
        if (run_dir / name).is_file():
            warnings += store.read_json(run_dir / name).get("health", {}).get("warnings", [])
    return warnings


def print_summary(run_dir: Path, stream: TextIO) -> None:
    rows = summary_rows(run_dir)
    width = max((len(k) for k, _ in rows), default=10)
    print(f"\nDRO run {run_dir}", file=stream)
    print(f"{'':-<{width + 30}}", file=stream)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", file=stream)
    for warning in health_warnings(run_dir):
        print(f"WARNING: {warning}", file=stream)


def write_plots(run_dir: Path, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from trainer.geometry import DroGeometry

    out_dir.mkdir(parents=True, exist_ok=True)
    geometry = DroGeometry.from_tensors(store.read_tensors(run_dir / "directions.safetensors"))
    states = store.read_tensors(run_dir / "states.safetensors")["states"]
    optimized = store.read_tensors(run_dir / "soft_prompt.safetensors")
    labels = store.read_json(run_dir / "labels.json")
    optimize = store.read_json(run_dir / "optimize.json")
    harmless = torch.tensor(labels["harmless"]) >= 0.5

    def coords(x):
        return geometry.pca.project(x)[:, :2]

    conditions = labels["conditions"]
    panels = [("no system prompt", states[conditions.index("none")]) if "none" in conditions else None,
              (f"human prompt '{optimize['init_prompt']}'", optimized["reference_states"]),
              ("trained soft prompt", optimized["trained_states"])]
    panels = [p for p in panels if p is not None]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), sharex=True, sharey=True)
    arrow = -geometry.refusal.weight[:2]
    arrow = arrow / (arrow.norm() + 1e-12)
    all_xy = torch.cat([coords(p[1]) for p in panels])
    scale = float(all_xy.abs().max()) * 0.5
    for ax, (title, panel_states) in zip(axes, panels):
        xy = coords(panel_states)
        ax.scatter(xy[~harmless, 0], xy[~harmless, 1], s=10, c="tab:red", label="harmful")
        ax.scatter(xy[harmless, 0], xy[harmless, 1], s=10, c="tab:blue", label="harmless")
        ax.annotate("", xy=(float(arrow[0]) * scale, float(arrow[1]) * scale), xytext=(0, 0),
                    arrowprops=dict(arrowstyle="->", color="black", lw=1.5))
        ax.set_title(title)
        ax.set_xlabel("PC1")
    axes[0].set_ylabel("PC2")
    axes[0].legend(loc="best", fontsize=8)
    figure.suptitle("Training queries in the first two PCA dimensions; arrow: refusal direction −w_r")
    figure.tight_layout()
    pca_path = out_dir / "pca_queries.png"
    figure.savefig(pca_path, dpi=110)
    plt.close(figure)

    history = optimize["history"]
    figure, axes = plt.subplots(1, 4, figsize=(17, 3.5))
    steps = [h["step"] for h in history]
    for ax, name, title in zip(axes, ("refusal", "harmfulness", "off_subspace"), ("L_r", "L_h", "L_U")):
        ax.plot(steps, [h[name] for h in history])
        ax.set_title(title)
        ax.set_xlabel("step")
    health = optimize.get("health", {})
    groups = [label for label in ("harmful", "harmless") if f"{label}_words_init" in health]
    for offset, when in ((-0.2, "init"), (0.2, "trained")):
        axes[3].bar([i + offset for i in range(len(groups))], [health[f"{g}_words_{when}"] for g in groups],
                    width=0.4, label=when)
    axes[3].set_xticks(range(len(groups)), groups)
    axes[3].set_title("greedy answer length (words)")
    if groups:
        axes[3].legend(fontsize=8)
    figure.tight_layout()
    loss_path = out_dir / "loss_curves.png"
    figure.savefig(loss_path, dpi=110)
    plt.close(figure)
    return [pca_path, loss_path]
