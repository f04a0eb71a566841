"""The `rmn-fx` command line: convert and inspect (convert.py); train, eval and report
(train.py); export (export.py); the options they share (options.py).

Bad input ends with one line on stderr, `rmn-fx: error: ...`, and exit code 2. Importing
this package loads click only: torch comes with the command that needs it, so
`rmn-fx --version` and `--help` answer at once.
"""

from __future__ import annotations

import sys

import click

from rmn_fx.cpu_settings import reserve_primitive_cache
from rmn_fx.errors import RMNError, TrainingFailed, TrainingInterrupted

from .convert import convert, inspect
from .export import export
from .train import evaluate, report, train


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="rmn-fx")
def cli():
    """Compile torchvision/timm models into routed networks: Neural Routing by Memory
    (RMN, the default), learned top-k gates, multi-path cross-connections and cross-prediction.

    MODEL is a torchvision name (resnet50), a timm name (convnext_tiny, or timm:NAME to
    force timm), or PACKAGE.MODULE:FACTORY for your own. Weights stay random unless
    --weights names a local file; nothing is downloaded.
    """


for command in (convert, inspect, train, evaluate, report, export):
    cli.add_command(command)


def main(argv=None) -> int:
    """Console entry point: one-line errors, exit code 2, no traceback. Routed models on
    the CPU need a larger oneDNN primitive cache than its default (`rmn_fx.cpu_settings`),
    reserved before any command builds one."""
    reserve_primitive_cache()
    try:
        cli.main(args=argv, prog_name="rmn-fx", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (click.UsageError, click.BadParameter) as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "rmn-fx"
        click.echo(f"rmn-fx: error: {exc.format_message()} (see {where} --help)", err=True)
        return 2
    except TrainingInterrupted as exc:
        click.echo(f"rmn-fx: {exc}", err=True)
        return exc.exit_code
    except TrainingFailed as exc:
        click.echo(f"rmn-fx: error: {exc}", err=True)
        return 1
    except RMNError as exc:
        click.echo(f"rmn-fx: error: {exc}", err=True)
        return 2
    except click.Abort:
        click.echo("rmn-fx: aborted", err=True)
        return 130
    return 0


def run() -> None:
    sys.exit(main())
