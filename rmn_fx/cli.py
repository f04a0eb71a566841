"""The `rmn-fx` command line: convert a model, inspect its stages; train, eval and report
(the recipes, in cli_train.py).

Bad input ends with one line on stderr, `rmn-fx: error: ...`, and exit code 2.
"""

from __future__ import annotations

import json
import sys

import click

from . import cli_train
from .errors import RMNError, TrainingInterrupted
from .measure import count_params


class InputSize(click.ParamType):
    """C,H,W or a single side H (3 channels, square)."""

    name = "C,H,W"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            parts = tuple(int(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"'{value}' is not C,H,W (e.g. 3,224,224) or a side (e.g. 224)", param, ctx)
        if len(parts) == 1:
            parts = (3, parts[0], parts[0])
        if len(parts) != 3 or min(parts) <= 0:
            self.fail(f"'{value}' is not C,H,W with three positive integers", param, ctx)
        return parts


class StageIndices(click.ParamType):
    name = "I,J,..."

    def convert(self, value, param, ctx):
        try:
            return sorted({int(v) for v in str(value).split(",") if v.strip()})
        except ValueError:
            self.fail(f"'{value}' is not a comma-separated list of stage numbers (e.g. 2,3,4)", param, ctx)


def model_options(f):
    """Options shared by every command that builds a model."""
    options = [
        click.argument("model"),
        click.option("--input-size", type=InputSize(), help="Sample input C,H,W (or H) for shape analysis [default: the model's own: timm's config, else 3,224,224]."),
        click.option("--stages", metavar="A:B,C:D", help="Name the stages by module-path ranges instead of detecting them (e.g. blocks.0:blocks.5,blocks.6:blocks.11)."),
        click.option("--num-classes", type=click.IntRange(min=1), help="Classifier size of the built model [default: the model's own]."),
        click.option("--weights", type=click.Path(dir_okay=False), help="Local state_dict or checkpoint to load into the model before conversion."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def build(model: str, num_classes, weights):
    from .models import create_model, load_weights

    net = create_model(model, num_classes)
    if weights:
        load_weights(net, weights)
    return net


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="rmn-fx")
def cli():
    """Compile torchvision/timm models into Neural Routing by Memory (RMN) networks.

    MODEL is a torchvision name (resnet50), a timm name (convnext_tiny, or timm:NAME to
    force timm), or PACKAGE.MODULE:FACTORY for your own. Weights stay random unless
    --weights names a local file; nothing is downloaded.
    """


@cli.command()
@model_options
@click.option("-b", "--branches", type=click.IntRange(min=1), default=8, show_default=True, help="Procedures (N) per routed stage.")
@click.option("--attention/--no-attention", default=True, show_default=True, help="Add Conditional Attention at the end of each routed stage.")
@click.option("--routed", type=StageIndices(), help="Stage numbers to route, e.g. 2,3,4 [default: all].")
@click.option("--momentum", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.9, show_default=True, help="Moving-average factor of the memories.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="File to write (rebuild with rmn_fx.load).")
def convert(model, input_size, stages, num_classes, weights, branches, attention, routed, momentum, output):
    """Convert MODEL into an RMN network and save it to --output.

    \b
    Example:
      rmn-fx convert resnet50 --branches 4 -o model.pt
    """
    from .files import check_writable
    from .serialization import save
    from .transform import transform

    check_writable(output)
    net = build(model, num_classes, weights)
    gm = transform(net, branches, attention, stages, routed, input_size, momentum)
    gm.meta["rmn_fx"]["source"] = {"model": model, "num_classes": num_classes}
    save(gm, output)
    base, converted = count_params(net), count_params(gm)
    routed_names = ", ".join(f"stage_{i}" for i in gm.meta["rmn_fx"]["routed"])
    click.echo(f"{model}: routed {routed_names} with {branches} procedures" + (" + attention" if attention else ""))
    click.echo(f"parameters: {base:,} -> {converted:,} ({converted / base:.2f}x)")
    click.echo(f"wrote {output}")


@cli.command()
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def inspect(model, input_size, stages, num_classes, weights, as_json):
    """Print the stem, stages and head that rmn-fx finds in MODEL.

    \b
    Example:
      rmn-fx inspect resnet50
      rmn-fx inspect vit_small_patch16_224 --stages blocks.0:blocks.5,blocks.6:blocks.11
    """
    from .transform import analyze

    net = build(model, num_classes, weights)
    anatomy = analyze(net, stages, input_size)
    rows = anatomy.parts()
    if as_json:
        click.echo(json.dumps({"model": model, "input_size": anatomy.input_size, "parts": rows}, indent=2))
        return
    click.echo(f"{model}  input {'x'.join(map(str, anatomy.input_size))}  {len(anatomy.stages)} stages")
    header = f"{'part':<9} {'in':>16} {'out':>16} {'params':>12} {'FLOPs':>6}  modules"
    click.echo(header)
    click.echo("-" * len(header))
    for row in rows:
        modules = row["modules"]
        shown = ", ".join(modules if len(modules) <= 4 else modules[:2] + ["...", modules[-1]])
        click.echo(
            f"{row['part']:<9} {_shape(row['in_shape']):>16} {_shape(row['out_shape']):>16} "
            f"{row['params']:>12,} {row['flops_share']:>6.1%}  {shown}"
        )
    ranges = anatomy.stage_ranges()
    click.echo(f"as --stages: {ranges}" if ranges else "(these stages hold function calls only; they cannot be written as --stages)")


cli.add_command(cli_train.train)
cli.add_command(cli_train.evaluate)
cli.add_command(cli_train.report)


def _shape(shape) -> str:
    return "x".join(map(str, shape)) if shape else "-"


def main(argv=None) -> int:
    """Console entry point: one-line errors, exit code 2, no traceback."""
    try:
        cli.main(args=argv, prog_name="rmn-fx", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (click.UsageError, click.BadParameter) as exc:
        click.echo(f"rmn-fx: error: {exc.format_message()} (see rmn-fx --help)", err=True)
        return 2
    except TrainingInterrupted as exc:
        click.echo(f"rmn-fx: {exc}", err=True)
        return 130
    except RMNError as exc:
        click.echo(f"rmn-fx: error: {exc}", err=True)
        return 2
    except click.Abort:
        click.echo("rmn-fx: aborted", err=True)
        return 130
    return 0


def run() -> None:
    sys.exit(main())
