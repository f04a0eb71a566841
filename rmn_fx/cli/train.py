"""`rmn-fx train`, `rmn-fx eval` and `rmn-fx report`: the recipes on the command line."""

from __future__ import annotations

import json
import os

import click
from click.core import ParameterSource

from rmn_fx.errors import OptionError, TrainingFailed, UntrustedCodeError

from .options import conversion_options, model_options, trust_factory_option

# options that override a value of the recipe (None: the recipe's)
RECIPE_OPTIONS = [
    click.option("--data", help="digits (embedded, default of the quick recipe), cifar10:PATH, cifar100:PATH or imagefolder:PATH (train/ and val/)."),
    click.option("--epochs", type=click.IntRange(min=1), help="Total epochs, stem training included [default: the recipe's]."),
    click.option("--stem-epochs", type=click.IntRange(min=0), help="Epochs of step 1 (plain network) before cloning [default: the recipe's]."),
    click.option("--batch-size", type=click.IntRange(min=1), help="Global batch size over all processes [default: the recipe's; paper: 256*N/2]."),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate (after warm-up) [default: the recipe's rule, scaled linearly with the batch size]."),
    click.option("--lr-start", type=click.FloatRange(min=0), help="Learning rate at step 0 (start of the warm-up)."),
    click.option("--lr-end", type=click.FloatRange(min=0), help="Learning rate at the end of the cosine decay."),
    click.option("--warmup-epochs", type=click.FloatRange(min=0), help="Epochs of linear warm-up."),
    click.option("--optimizer", type=click.Choice(["sgd", "rmsprop", "adamw"]), help="[default: the recipe's; the paper recipes use RMSprop for EfficientNet]."),
    click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), help="The optimizer's momentum (AdamW: beta1)."),
    click.option("--weight-decay", type=click.FloatRange(min=0), help="Weight decay (not on norms and biases)."),
    click.option("--classifier-init", type=click.Choice(["model", "zero"]), help="The classifier of a from-scratch model: its own init, or zeros [default: the recipe's; quick: zero for EfficientNet]."),
]
RECIPE_KEYS = ("data", "epochs", "stem_epochs", "batch_size", "lr", "lr_start", "lr_end", "warmup_epochs", "optimizer", "momentum", "weight_decay", "memory_momentum", "input_size", "remove_downsamplings", "classifier_init")


def _recipe_options(f):
    for option in reversed(RECIPE_OPTIONS):
        f = option(f)
    return f


@click.command()
@model_options(model_required=False, input_help="the recipe's, e.g. 32 for quick")
@conversion_options
@click.option("--recipe", default="quick", show_default=True, help="quick, paper-cifar100, paper-tinyimagenet or paper-imagenet.")
@_recipe_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of weights, batches, augmentation, every step's random draws and k-means.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="auto: CUDA when available.")
@click.option("--amp/--no-amp", default=None, help="Mixed precision (float16 on CUDA, bfloat16 on CPU) [default: on for CUDA only].")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--dead-window", type=click.IntRange(min=1), default=50, show_default=True, help="Steps without a sample after which a procedure is dead.")
@click.option("--revive/--no-revive", default=True, show_default=True, help="Revive dead procedures by splitting the busiest one.")
@click.option("--kmeans-samples", type=click.IntRange(min=1), help="Cap on the keys used by k-means (at least --branches) [default: the whole training set].")
@click.option("--balance-loss", type=click.FloatRange(min=0), default=0.01, show_default=True, help="Weight of the gate's load-balancing loss (--routing gate).")
@click.option("--sync-bn", is_flag=True, help="SyncBatchNorm across processes (torchrun on CUDA), as in the paper.")
@click.option("--max-loss", type=click.FloatRange(min=0, min_open=True), help="Stop when the training loss (mean of 20 steps) exceeds it [default: 10 x ln(classes)].")
@trust_factory_option
@click.option("-o", "--output", "run_dir", type=click.Path(file_okay=False), help="Run directory to create.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue the run in this directory from its last checkpoint.")
@click.pass_context
def train(ctx, model, branches, recipe, trust_factory, run_dir, resume_dir, **options):
    """Train MODEL with the recipe of its routing rule into a run directory.

    Stem training, cloning (optimizer state included), k-means memory initialisation
    (memory routing; the other rules train on from the clones) and routed training on
    one LR curve; a checkpoint after every step and epoch, and on Ctrl-C or SIGTERM.
    Start several processes with torchrun for data-parallel training.

    \b
    Examples:
      rmn-fx train resnet18 --branches 8 -o runs/r18
      rmn-fx train resnet18 --branches 4 --routing gate --top-k 2 -o runs/moe
      rmn-fx train vit_tiny_patch16_224 --input-size 224 --stages blocks.0:blocks.5,blocks.6:blocks.11 -o runs/vit
      rmn-fx train resnet18 --data cifar100:/data/cifar-100-python --recipe paper-cifar100 -o runs/c100
      torchrun --nproc_per_node=8 -m rmn_fx train resnet50 --data imagefolder:/data/imagenet --recipe paper-imagenet -o runs/in
      rmn-fx train --resume runs/r18
    """
    from rmn_fx.recipes.config import RunConfig
    from rmn_fx.recipes.run_dir import RunDirectory
    from rmn_fx.recipes.trainer import train as run_training

    if options["input_size"] is not None:
        options["input_size"] = list(options["input_size"])
    if resume_dir:
        if run_dir:
            raise OptionError("give either -o (a new run) or --resume (an earlier one), not both")
        run = RunDirectory(resume_dir)
        config = run.read_config()
        given = {name for name in ctx.params if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
        values = {**ctx.params, **options}
        asked = {key: values[key] for key in given if key in config.to_dict()}
        if model:
            asked["model"] = model
        config.check_identity(asked, resume_dir)
        changed = config.changed(asked)
        if changed:
            raise OptionError(f"--{changed[0].replace('_', '-')} cannot change when resuming; resume with the run's own settings")
        if run.state == "finished":
            result = run.read_json(run.paths.evaluation)
            click.echo(f"'{resume_dir}' has finished: test accuracy {result['accuracy']:.4f}; nothing to resume (see rmn-fx report {resume_dir})")
            return
        config.device, config.workers = options["device"], options["workers"]
        _check_trusted(config.model, trust_factory, resume_dir)
        _finish(run_training(config, resume_dir, resume=True), resume_dir)
        return
    if not model:
        raise OptionError("name the model to train (e.g. rmn-fx train resnet18 -o runs/r18), or --resume RUN")
    if not run_dir:
        raise OptionError("give the run directory with -o (e.g. -o runs/r18)")
    overrides = {key: options.pop(key) for key in RECIPE_KEYS}
    config = RunConfig.create(recipe, model, branches, overrides, options)
    click.echo(
        f"{model}: {branches} procedures, {config.routing_config().describe()}, recipe {recipe} on {config.data}, "
        f"{config.epochs} epochs ({config.stem_epochs} stem), batch {config.batch_size}, lr {config.lr_rule}"
    )
    _finish(run_training(config, run_dir), run_dir)


def _check_trusted(model: str, trust_factory: bool, where: str) -> None:
    from rmn_fx.models import is_factory

    if is_factory(model) and not trust_factory:
        raise UntrustedCodeError(
            f"'{where}' trains the factory '{model}', which resuming would import and call; if you trust this run directory, add --trust-factory"
        )


def _finish(evaluation: dict, run_dir: str) -> None:
    accuracy, chance = evaluation["accuracy"], evaluation["chance_accuracy"]
    if evaluation["at_chance"]:
        raise TrainingFailed(
            f"test accuracy {accuracy:.4f} is at chance ({chance:.4f}): the model did not learn; "
            f"see rmn-fx report {run_dir}, then lower --lr or train longer"
        )
    click.echo(f"test accuracy {accuracy:.4f} (chance {chance:.4f}); wrote {run_dir}/model.pt (see rmn-fx report {run_dir})")


@click.command(name="eval")
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("--data", default="digits", show_default=True, help="digits, cifar10:PATH, cifar100:PATH or imagefolder:PATH; its test split is used.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the evaluation as JSON instead of the table.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Also write the evaluation to this JSON file.")
@trust_factory_option
def evaluate(model_file, data, batch_size, device, as_json, output, trust_factory):
    """Accuracy and routing statistics of a trained model on a test set.

    Per stage: samples per procedure, unused procedures, load balance (entropy / log N)
    and how much the routes tell about the classes (and, on digits, the hidden visual
    contexts): normalized mutual information and purity.

    \b
    Example:
      rmn-fx eval runs/r18/model.pt --data digits -o runs/r18/eval.json
    """
    from rmn_fx.files import check_writable, write_text
    from rmn_fx.recipes.evaluation import evaluate_file

    if output:
        check_writable(output)
    report = evaluate_file(model_file, data, batch_size, device, trust_factory)
    if output:
        write_text(output, json.dumps(report, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    chance = " AT CHANCE" if report["at_chance"] else ""
    click.echo(
        f"{model_file} on {data}: accuracy {report['accuracy']:.4f} (chance {report['chance_accuracy']:.4f}{chance})  "
        f"loss {report['loss']:.4f}  ({report['samples']} test images)"
    )
    has_context = any("nmi_context" in row for row in report["stages"])
    header = f"{'stage':>5}  {'unused':>6}  {'balance':>7}  {'NMI class':>9}" + (f"  {'NMI context':>11}" if has_context else "") + "  samples per procedure"
    click.echo(header)
    for row in report["stages"]:
        line = f"{row['stage']:>5}  {row['unused_procedures']:>6}  {row['entropy']:>7.3f}  {row['nmi_class']:>9.3f}"
        if has_context:
            line += f"  {row['nmi_context']:>11.3f}"
        click.echo(line + "  " + " ".join(map(str, row["samples_per_procedure"])))
    if output:
        click.echo(f"wrote {output}")


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def report(run_dir):
    """Plots and a summary table of a training run, written to RUN/report/.

    curves.png (loss and accuracy of the stem and routed phases), load.png (samples per
    procedure per stage over the epochs), routes.png (procedure-by-class and, on digits,
    procedure-by-context heat maps of the final model) and summary.md (the run's model,
    N, recipe and data, the epochs, the final routing; a run at chance is flagged).

    \b
    Example:
      rmn-fx report runs/r18
    """
    from rmn_fx.recipes.report import write_report

    summary, files = write_report(run_dir)
    click.echo(summary)
    for path in files:
        click.echo(f"wrote {os.path.join(run_dir, 'report', path)}")
