"""`rmn-fx convert` and `rmn-fx inspect`."""

from __future__ import annotations

import json

import click

from .options import conversion_options, model_options, num_classes_option


def build(model: str, num_classes, weights):
    from rmn_fx.models import create_model, load_weights

    net = create_model(model, num_classes)
    if weights:
        load_weights(net, weights)
    return net


@click.command()
@model_options()
@num_classes_option
@conversion_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="File to write (rebuild with rmn_fx.load).")
def convert(model, weights, input_size, stages, remove_downsamplings, num_classes, branches, attention, routed, memory_momentum, output):
    """Convert MODEL into an RMN network and save it to --output.

    \b
    Example:
      rmn-fx convert resnet50 --branches 4 -o model.pt
    """
    from rmn_fx.conversion import transform
    from rmn_fx.files import check_writable
    from rmn_fx.measure import count_params
    from rmn_fx.serialization import save
    from rmn_fx.tracing import trace

    check_writable(output)
    net = build(model, num_classes, weights)
    momentum = 0.9 if memory_momentum is None else memory_momentum
    gm = transform(net, branches, attention, stages, routed, input_size, momentum, remove_downsamplings=remove_downsamplings or 0)
    gm.meta["rmn_fx"]["source"] = {"model": model, "num_classes": num_classes}
    save(gm, output)
    base, converted = count_params(trace(net)), count_params(gm)  # the traced base: what its forward uses
    routed_names = ", ".join(f"stage_{i}" for i in gm.meta["rmn_fx"]["routed"])
    click.echo(f"{model}: routed {routed_names} with {branches} procedures" + (" + attention" if attention else ""))
    dropped = count_params(net) - base
    note = f" (the base's forward leaves {dropped:,} parameters unused, e.g. auxiliary heads: not counted)" if dropped else ""
    click.echo(f"parameters: {base:,} -> {converted:,} ({converted / base:.2f}x){note}")
    click.echo(f"wrote {output}")


@click.command()
@model_options()
@num_classes_option
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def inspect(model, weights, input_size, stages, remove_downsamplings, num_classes, as_json):
    """Print the stem, stages and head that rmn-fx finds in MODEL.

    \b
    Example:
      rmn-fx inspect resnet50
      rmn-fx inspect vit_small_patch16_224 --stages blocks.0:blocks.5,blocks.6:blocks.11
    """
    from rmn_fx.conversion import analyze

    net = build(model, num_classes, weights)
    anatomy = analyze(net, stages, input_size, remove_downsamplings=remove_downsamplings or 0)
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


def _shape(shape) -> str:
    return "x".join(map(str, shape)) if shape else "-"
