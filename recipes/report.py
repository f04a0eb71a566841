"""`rmn-fx report`: PNG plots and a summary of a run directory.

    report/curves.png  train and test loss and accuracy per epoch, stem and routed phases shaded
    report/load.png    per stage: share of training samples per procedure over the epochs
    report/routes.png  per stage: test samples by (top) procedure and class, and by procedure
                       and hidden context where the data has them (final model)
    report/mixing.png  rules that mix paths: per stage, the mean mixing weights (source x
                       destination) and the mean combining weight of each path (final model)
    report/summary.md  what was trained (model, N, routing, recipe, data), the per-epoch
                       table, the final routing statistics; a run at chance is flagged
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np

from rmn_fx.files import atomic_write, write_text

from .config import RunError
from .run_dir import RunDirectory


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_report(run_dir: str) -> tuple[str, list[str]]:
    """Write the report files; returns the summary text and the file names written."""
    run = RunDirectory(run_dir)
    paths = run.paths
    if not os.path.isfile(paths.metrics):
        raise RunError(f"'{run_dir}' has no metrics.jsonl; give the -o folder of a `rmn-fx train` run that finished an epoch")
    config = run.read_config()
    history = _read_jsonl(paths.metrics)
    evaluation = run.read_json(paths.evaluation) if run.state == "finished" else None
    os.makedirs(paths.report, exist_ok=True)
    written = [_save(paths.report, "curves.png", plot_curves(history))]
    if any("train_samples_per_procedure" in stage for row in history for stage in row.get("stages", [])):
        written.append(_save(paths.report, "load.png", plot_load(history)))
    if evaluation and evaluation["routes_by_class"]:
        written.append(_save(paths.report, "routes.png", plot_routes(evaluation)))
    if evaluation and evaluation.get("mean_weights"):
        written.append(_save(paths.report, "mixing.png", plot_mixing(evaluation["mean_weights"])))
    summary = summary_text(config, history, evaluation)
    write_text(os.path.join(paths.report, "summary.md"), summary)
    written.append("summary.md")
    return summary, written


def _save(folder: str, name: str, figure) -> str:
    atomic_write(os.path.join(folder, name), lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(figure)
    return name


def _shade_phases(ax, history: list[dict]) -> None:
    routed = [row["epoch"] for row in history if row["phase"] == "routed"]
    if routed:
        ax.axvspan(min(routed) - 0.5, max(routed) + 0.5, color="tab:green", alpha=0.08, label="routed phase")


def plot_curves(history: list[dict]):
    epochs = [row["epoch"] for row in history]
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for ax, key, title in ((loss_ax, "loss", "loss"), (acc_ax, "accuracy", "top-1 accuracy")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], "o-", label="train")
        ax.plot(epochs, [row[f"test_{key}"] for row in history], "s-", label="test")
        _shade_phases(ax, history)
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    loss_ax.set_yscale("log")
    figure.suptitle("stem phase (white), routed phase (green)")
    return figure


def plot_load(history: list[dict]):
    routed = [row for row in history if "stages" in row]
    stages = len(routed[0]["stages"])
    figure, axes = plt.subplots(1, stages, figsize=(4 * stages + 1, 3.8), squeeze=False, sharey=True, layout="constrained")
    epochs = [row["epoch"] for row in routed]
    for i, ax in enumerate(axes[0]):
        counts = np.array([row["stages"][i]["train_samples_per_procedure"] for row in routed], dtype=float)
        shares = counts / counts.sum(1, keepdims=True).clip(min=1)
        ax.stackplot(epochs, shares.T, labels=[f"P{j}" for j in range(shares.shape[1])])
        ax.set(title=f"stage {routed[0]['stages'][i]['stage']}", xlabel="epoch", ylim=(0, 1))
        if i == 0:
            ax.set_ylabel("share of training samples")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize="small", title="procedure")
    figure.suptitle("procedure load per stage (a band that vanishes is a dead procedure)")
    return figure


def plot_routes(evaluation: dict):
    """One column per stage; rows: routes by class, and by hidden context if known."""
    rows = [("class", evaluation["routes_by_class"], evaluation["classes"], "nmi_class")]
    if evaluation.get("routes_by_context"):
        rows.append(("context", evaluation["routes_by_context"], evaluation["contexts"], "nmi_context"))
    stages = len(evaluation["routes_by_class"])
    figure, axes = plt.subplots(len(rows), stages, figsize=(3.4 * stages + 1.5, 3.4 * len(rows)), squeeze=False, layout="constrained")
    for r, (what, tables, labels, nmi) in enumerate(rows):
        for i, table in enumerate(tables):
            ax, table = axes[r][i], np.array(table, dtype=float)
            shares = table / table.sum(0, keepdims=True).clip(min=1)  # per label: where its samples went
            image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=1)
            stage = evaluation["stages"][i]
            ax.set(title=f"stage {stage['stage']}, NMI {stage[nmi]:.2f}", xlabel=what, ylabel="procedure")
            if len(labels) <= 20:
                ax.set_xticks(range(len(labels)), labels, fontsize="small", rotation=45 if what == "context" else 0)
            ax.set_yticks(range(table.shape[0]))
        figure.colorbar(image, ax=axes[r].tolist(), label=f"share of the {what}'s test samples")
    figure.suptitle("where the test samples of each class" + (" and each hidden context" if len(rows) > 1 else "") + " go")
    return figure


def plot_mixing(mean_weights: list[dict]):
    """One column per stage that weighs paths: its mean mixing matrix (where it mixes the
    paths it receives) above its mean combining weight per path (where the paths leave)."""
    kinds = [k for k in ("mix", "combine") if any(k in w for w in mean_weights)]
    figure, axes = plt.subplots(len(kinds), len(mean_weights), figsize=(3.4 * len(mean_weights) + 1.5, 3.2 * len(kinds)), squeeze=False, layout="constrained")
    for column, weights in enumerate(mean_weights):
        for row, kind in enumerate(kinds):
            ax = axes[row][column]
            if kind not in weights:
                ax.axis("off")
                continue
            matrix = np.array(weights[kind], dtype=float)
            matrix = matrix if kind == "mix" else matrix[:, None]
            image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=1)
            what = "mixing: source path x destination path" if kind == "mix" else "combining weight per path"
            ax.set(title=f"stage {weights['stage']}\n{what}", ylabel="source path" if kind == "mix" else "path", xlabel="destination path" if kind == "mix" else "")
            ax.set_yticks(range(matrix.shape[0]))
            ax.set_xticks(range(matrix.shape[1]) if kind == "mix" else [])
            for (y, x), value in np.ndenumerate(matrix):
                ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize="small", color="white" if value < 0.6 else "black")
    figure.colorbar(image, ax=axes.ravel().tolist(), label="mean weight over the test samples")
    figure.suptitle("how the paths are mixed and combined (mean over the test set; 1/N everywhere = no preference)")
    return figure


def summary_text(config, history: list[dict], evaluation: dict | None) -> str:
    """What was trained, the epochs, the final routing; a warning first if at chance."""
    routing = config.routing_config().describe() + f", N = {config.branches}" if config.branches > 1 else "none (N = 1)"
    lines = []
    if evaluation and evaluation.get("at_chance"):
        lines += [f"**WARNING: the final test accuracy {evaluation['accuracy']:.4f} is at chance ({evaluation['chance_accuracy']:.4f}): the model did not learn.**", ""]
    lines += [
        f"# {config.model}",
        "",
        f"- model: {config.model}, input {'x'.join(map(str, config.input_size))}"
        + (f", stages {config.stages}" if config.stages else "")
        + (f", routed stages {config.routed}" if config.routed else "")
        + (f", weights {config.weights}" if config.weights else ""),
        f"- routing: {routing}",
        f"- recipe: {config.recipe}; {config.epochs} epochs ({config.stem_epochs} stem), batch {config.batch_size}, lr {config.lr_rule}, seed {config.seed}",
        f"- data: {config.data}",
        "",
        "| epoch | phase | lr | train loss | train acc | test loss | test acc | dead | revived |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in history:
        lines.append(
            f"| {row['epoch']} | {row['phase']} | {row['lr']:.3g} | {row['train_loss']:.4f} | {row['train_accuracy']:.4f} "
            f"| {row['test_loss']:.4f} | {row['test_accuracy']:.4f} | {row.get('dead_procedures', '-')} | {row.get('revived_procedures', '-')} |"
        )
    if evaluation:
        lines += ["", f"final test accuracy {evaluation['accuracy']:.4f} on {evaluation['samples']} images (chance {evaluation['chance_accuracy']:.4f})", ""]
        context = any("nmi_context" in s for s in evaluation["stages"])
        lines += ["| stage | unused | balance | NMI class | purity class |" + (" NMI context |" if context else ""), "|---|---|---|---|---|" + ("---|" if context else "")]
        for s in evaluation["stages"]:
            lines.append(
                f"| {s['stage']} | {s['unused_procedures']} | {s['entropy']:.3f} | {s['nmi_class']:.3f} | {s['purity_class']:.3f} |"
                + (f" {s['nmi_context']:.3f} |" if context else "")
            )
    return "\n".join(lines) + "\n"
