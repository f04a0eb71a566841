"""Options shared by the commands, so that each has one name and one meaning everywhere.

    model_options        MODEL, --weights, --input-size, --stages, --granularity, --remove-downsamplings
    conversion_options   --routing, --branches, --routed and the rules' options: --top-k (gate),
                         --attention/--no-attention and --memory-momentum (memory)
    --num-classes        convert and inspect (train takes the class count from its data)
    --trust-factory      commands that rebuild a model from a file or a run directory
and the parameter types they use (stage numbers, batch sizes, rule and format names).
"""

from __future__ import annotations

import click


class InputSize(click.ParamType):
    """C,H,W (an image), C,T,H,W (a video) or a single side S (3 channels, square image)."""

    name = "C,[T,]H,W"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            parts = tuple(int(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"'{value}' is not C,H,W (e.g. 3,224,224), C,T,H,W (e.g. 3,16,112,112) or a side (e.g. 224)", param, ctx)
        if len(parts) == 1:
            parts = (3, parts[0], parts[0])
        if len(parts) not in (3, 4) or min(parts) <= 0:
            self.fail(f"'{value}' is not C,H,W or C,T,H,W with positive integers", param, ctx)
        return parts


def integers(value) -> list[int]:
    """The integers of a comma-separated list ("2,3,4"); ValueError if one is not."""
    return [int(v) for v in str(value).split(",") if v.strip()]


class StageIndices(click.ParamType):
    name = "I,J,..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return sorted(set(integers(value)))
        except ValueError:
            self.fail(f"'{value}' is not a comma-separated list of stage numbers (e.g. 2,3,4)", param, ctx)


class BatchSizes(click.ParamType):
    name = "B,B,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            batches = tuple(integers(value))
        except ValueError:
            batches = ()
        if not batches or min(batches) < 1:
            self.fail(f"'{value}' is not a comma-separated list of batch sizes >= 1 (e.g. 1,2,7,64)", param, ctx)
        return batches


def _apply(options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def model_options(model_required: bool = True, input_help: str = "the model's own: timm's config, else 3,224,224"):
    """MODEL and how to build and analyse it."""
    return _apply(
        [
            click.argument("model", required=model_required),
            click.option("--weights", type=click.Path(dir_okay=False), help="Local state_dict or checkpoint to load into the model before conversion."),
            click.option("--input-size", type=InputSize(), help=f"Input C,H,W, C,T,H,W for a video, or a side S [default: {input_help}]."),
            click.option("--stages", metavar="A:B,C:D", help="Name the stages by module-path ranges instead of detecting them (e.g. blocks.0:blocks.5,blocks.6:blocks.11)."),
            click.option("--granularity", type=click.Choice(["stage", "block"]), default="stage", show_default=True, help="Route whole stages, or every block inside a stage as a part of its own (then --routed counts blocks)."),
            click.option("--remove-downsamplings", type=click.IntRange(min=0), help="Make the first K downsamplings keep the resolution (small images) [default: 0; paper: 2 on CIFAR and Tiny ImageNet]."),
        ]
    )


class RuleName(click.ParamType):
    """A registered routing rule, checked against the registry only when used (so that
    `--help` does not import torch)."""

    name = "RULE"

    def convert(self, value, param, ctx):
        from rmn_fx.nn.rules import rule_names

        if value not in rule_names():
            self.fail(f"'{value}' is not a routing rule; choose one of: {', '.join(rule_names())}", param, ctx)
        return value


class ExportFormat(click.ParamType):
    """A registered export format, checked against the registry only when used (as `RuleName`)."""

    name = "FORMAT"

    def convert(self, value, param, ctx):
        from rmn_fx.deploy import FORMATS

        if value not in FORMATS:
            self.fail(f"'{value}' is not an export format; choose one of: {', '.join(FORMATS)}", param, ctx)
        return value


ROUTING_HELP = "The routing rule: memory (RMN), gate (learned top-k), cross-connections or cross-prediction (multi-path)."
CONVERSION_PARAMS = ("routing", "branches", "top_k", "attention", "routed", "memory_momentum")


def conversion_options(f):
    """How the stages are routed."""
    return _apply(
        [
            click.option("--routing", type=RuleName(), default="memory", show_default=True, help=ROUTING_HELP),
            click.option("-b", "--branches", type=click.IntRange(min=1), default=8, show_default=True, help="Procedures (N) per routed stage."),
            click.option("--top-k", type=click.IntRange(min=1), help="Procedures each sample runs through, for --routing gate [default: 1]."),
            click.option("--attention/--no-attention", default=None, help="Conditional Attention at the end of each routed stage, for --routing memory [default: on]."),
            click.option("--routed", type=StageIndices(), help="Stage numbers to route, e.g. 2,3,4 [default: all]."),
            click.option("--memory-momentum", type=click.FloatRange(0.0, 1.0, max_open=True), help="Moving-average factor a of the memories [default: 0.9, the paper's]."),
        ]
    )(f)


num_classes_option = click.option("--num-classes", type=click.IntRange(min=1), help="Classifier size of the built model [default: the model's own].")

trust_factory_option = click.option(
    "--trust-factory",
    is_flag=True,
    help="Let a file that names a PACKAGE.MODULE:FACTORY import and call it (runs that code; only for files you trust).",
)
