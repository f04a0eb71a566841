"""`rmn-fx train`, `rmn-fx eval` and `rmn-fx report`: the recipes on the command line."""

from __future__ import annotations

import json
import os

import click
from click.core import ParameterSource

from .errors import OptionError

# options that override a recipe value, by config key (None: the recipe's value)
RECIPE_OPTIONS = [
    click.option("--data", help="digits (embedded, default of the quick recipe), cifar10:PATH, cifar100:PATH or imagefolder:PATH (train/ and val/)."),
    click.option("--epochs", type=click.IntRange(min=1), help="Total epochs, stem training included [default: the recipe's]."),
    click.option("--stem-epochs", type=click.IntRange(min=0), help="Epochs of step 1 (plain network) before cloning [default: the recipe's]."),
    click.option("--batch-size", type=click.IntRange(min=1), help="Global batch size over all processes [default: the recipe's; paper: 256*N/2]."),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate (after warm-up)."),
    click.option("--lr-start", type=click.FloatRange(min=0), help="Learning rate at step 0 (start of the warm-up)."),
    click.option("--lr-end", type=click.FloatRange(min=0), help="Learning rate at the end of the cosine decay."),
    click.option("--warmup-epochs", type=click.FloatRange(min=0), help="Epochs of linear warm-up."),
    click.option("--optimizer", type=click.Choice(["sgd", "rmsprop"]), help="[default: the recipe's; RMSprop for EfficientNet in the paper recipes]."),
    click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), help="Optimizer momentum."),
    click.option("--weight-decay", type=click.FloatRange(min=0), help="Weight decay (not on norms and biases)."),
    click.option("--memory-momentum", type=click.FloatRange(0, 1, max_open=True), help="Moving-average factor a of the memories [paper: 0.9]."),
    click.option("--image-size", type=click.IntRange(min=8), help="Side of the square training images."),
    click.option("--remove-downsamplings", type=click.IntRange(min=0), help="Remove the first K downsamplings (small images) [paper: 2 on CIFAR and Tiny ImageNet]."),
]


def _recipe_options(f):
    for option in reversed(RECIPE_OPTIONS):
        f = option(f)
    return f


@click.command()
@click.argument("model", required=False)
@click.option("-b", "--branches", type=click.IntRange(min=1), default=8, show_default=True, help="Procedures (N) per stage; 1 with --no-attention trains the base model.")
@click.option("--recipe", default="quick", show_default=True, help="quick, paper-cifar100, paper-tinyimagenet or paper-imagenet.")
@_recipe_options
@click.option("--attention/--no-attention", default=True, show_default=True, help="Conditional Attention in every stage.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of weights, batches, augmentation and k-means.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="auto: CUDA when available.")
@click.option("--amp/--no-amp", default=None, help="Mixed precision (float16 on CUDA, bfloat16 on CPU) [default: on for CUDA only].")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--dead-window", type=click.IntRange(min=1), default=50, show_default=True, help="Steps without a sample after which a procedure is dead.")
@click.option("--revive/--no-revive", default=True, show_default=True, help="Revive dead procedures by splitting the busiest one.")
@click.option("--kmeans-samples", type=click.IntRange(min=1), help="Cap on the keys used by k-means [default: the whole training set].")
@click.option("--sync-bn", is_flag=True, help="SyncBatchNorm across processes (torchrun on CUDA), as in the paper.")
@click.option("-o", "--output", "run_dir", type=click.Path(file_okay=False), help="Run directory to create.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue the run in this directory from its last checkpoint.")
@click.pass_context
def train(ctx, model, branches, recipe, attention, seed, device, amp, workers, dead_window, revive, kmeans_samples, sync_bn, run_dir, resume_dir, **overrides):
    """Train MODEL with the four-step RMN recipe into a run directory.

    Stem training, cloning (optimizer state included), k-means memory initialisation
    and routed training on one LR curve; a checkpoint after every step and epoch.
    Start several processes with torchrun for data-parallel training.

    \b
    Examples:
      rmn-fx train resnet18 --branches 8 -o runs/r18
      rmn-fx train resnet18 --data cifar100:/data/cifar-100-python --recipe paper-cifar100 -o runs/c100
      torchrun --nproc_per_node=8 -m rmn_fx train resnet50 --data imagefolder:/data/imagenet --recipe paper-imagenet -o runs/in
      rmn-fx train --resume runs/r18
    """
    from rmn_fx.recipes.presets import resolve
    from rmn_fx.recipes.run import check_resume, read_run_config
    from rmn_fx.recipes.run import train as run_training

    given = {name for name in ctx.params if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    if resume_dir:
        if run_dir:
            raise OptionError("give either -o (a new run) or --resume (an earlier one), not both")
        config = read_run_config(resume_dir)
        asked = {key: ctx.params[key] for key in given if key in config}
        if model:
            asked["model"] = model
        check_resume(config, asked, resume_dir)
        changed = sorted(k for k, v in asked.items() if config.get(k) != v and k not in ("device", "workers"))
        if changed:
            raise OptionError(f"--{changed[0].replace('_', '-')} cannot change when resuming; resume with the run's own settings")
        for key in ("device", "workers"):
            config[key] = ctx.params[key]
        run_training(config, resume_dir, resume=True)
        return
    if not model:
        raise OptionError("name the model to train (e.g. rmn-fx train resnet18 -o runs/r18), or --resume RUN")
    if not run_dir:
        raise OptionError("give the run directory with -o (e.g. -o runs/r18)")
    settings = {
        "attention": attention, "seed": seed, "device": device, "amp": amp, "workers": workers,
        "dead_window": dead_window, "revive": revive, "kmeans_samples": kmeans_samples, "sync_bn": sync_bn,
    }
    config = {**resolve(recipe, model, branches, overrides), **settings}
    evaluation = run_training(config, run_dir)
    click.echo(f"test accuracy {evaluation['accuracy']:.4f}; wrote {run_dir}/model.pt (see rmn-fx report {run_dir})")


@click.command(name="eval")
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("--data", default="digits", show_default=True, help="digits, cifar10:PATH, cifar100:PATH or imagefolder:PATH; its test split is used.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the evaluation to this JSON file.")
def evaluate(model_file, data, batch_size, device, json_path):
    """Accuracy and routing statistics of a trained model on a test set.

    Per stage: samples per procedure, unused procedures, load balance (entropy / log N)
    and how much the routes tell about the classes (and, on digits, the hidden visual
    contexts): normalized mutual information and purity.

    \b
    Example:
      rmn-fx eval runs/r18/model.pt --data digits
    """
    from rmn_fx.files import check_writable
    from rmn_fx.recipes.evaluation import evaluate_file

    if json_path:
        check_writable(json_path)
    report = evaluate_file(model_file, data, batch_size, device)
    click.echo(f"{model_file} on {data}: accuracy {report['accuracy']:.4f}  loss {report['loss']:.4f}  ({report['samples']} test images)")
    has_context = any("nmi_context" in row for row in report["stages"])
    header = f"{'stage':>5}  {'unused':>6}  {'balance':>7}  {'NMI class':>9}" + (f"  {'NMI context':>11}" if has_context else "") + "  samples per procedure"
    click.echo(header)
    for row in report["stages"]:
        line = f"{row['stage']:>5}  {row['unused_procedures']:>6}  {row['entropy']:>7.3f}  {row['nmi_class']:>9.3f}"
        if has_context:
            line += f"  {row['nmi_context']:>11.3f}"
        click.echo(line + "  " + " ".join(map(str, row["samples_per_procedure"])))
    if json_path:
        from rmn_fx.files import write_text

        write_text(json_path, json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_path}")


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def report(run_dir):
    """Plots and a summary table of a training run, written to RUN/report/.

    curves.png (loss and accuracy of the stem and routed phases), load.png (samples per
    procedure per stage over the epochs), routes.png (procedure-by-class heat maps of the
    final model) and summary.md.

    \b
    Example:
      rmn-fx report runs/r18
    """
    from rmn_fx.recipes.report import write_report

    summary, files = write_report(run_dir)
    click.echo(summary)
    for path in files:
        click.echo(f"wrote {os.path.join(run_dir, 'report', path)}")
