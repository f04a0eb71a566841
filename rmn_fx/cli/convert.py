"""`rmn-fx convert` and `rmn-fx inspect`."""

from __future__ import annotations

import json

import click
from click.core import ParameterSource

from .options import (
    CONVERSION_PARAMS,
    conversion_options,
    model_options,
    num_classes_option,
)


def build(model: str, num_classes, weights, input_size):
    """The network MODEL names (with local weights, if given) and the input size to analyse
    it at: the one asked for, else the model's own (which may depend on its name)."""
    from rmn_fx.models import (
        check_convertible,
        create_model,
        default_input_size,
        load_weights,
    )

    check_convertible(model)
    net = create_model(model, num_classes)
    if weights:
        load_weights(net, weights)
    return net, input_size or default_input_size(net, model)


@click.command()
@model_options()
@num_classes_option
@conversion_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="File to write (rebuild with rmn_fx.load).")
def convert(model, weights, input_size, stages, granularity, remove_downsamplings, num_classes, routing, branches, top_k, attention, routed, memory_momentum, output):
    """Convert MODEL into a routed network and save it to --output.

    \b
    Examples:
      rmn-fx convert resnet50 --branches 4 -o model.pt
      rmn-fx convert resnet50 --branches 4 --routing cross-connections -o cc.pt
      rmn-fx convert resnet50 --branches 4 --routing cross-prediction --granularity block -o cp.pt
      rmn-fx convert timm:convnext_atto --branches 8 --routing gate --top-k 2 -o moe.pt
    """
    from rmn_fx.conversion import left_out_said_elsewhere, transform
    from rmn_fx.files import check_writable
    from rmn_fx.measure import count_params
    from rmn_fx.nn.rules import RoutingConfig
    from rmn_fx.serialization import save
    from rmn_fx.tracing import describe_left_out

    check_writable(output)
    net, input_size = build(model, num_classes, weights, input_size)
    with left_out_said_elsewhere():  # said below, in the CLI's words
        gm = transform(net, branches, attention, stages, routed, input_size, memory_momentum, remove_downsamplings=remove_downsamplings or 0, routing=routing, top_k=top_k, granularity=granularity)
    gm.meta["rmn_fx"]["source"] = {"model": model, "num_classes": num_classes}
    save(gm, output)
    base, converted = gm.meta["rmn_fx"]["base_params"], count_params(gm)  # the base's parameters its forward uses
    routed_names = ", ".join(f"stage_{i}" for i in gm.meta["rmn_fx"]["routed"])
    click.echo(f"{model}: routed {routed_names} with {branches} procedures, {RoutingConfig.from_meta(gm.meta['rmn_fx']).describe()}")
    click.echo(f"parameters: {base:,} -> {converted:,} ({converted / base:.2f}x)")
    left_out = gm.meta["rmn_fx"]["left_out"]
    if left_out:
        click.echo(f"note: {describe_left_out(left_out)}")
    click.echo(f"wrote {output}")


@click.command()
@model_options()
@num_classes_option
@conversion_options
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.pass_context
def inspect(ctx, model, weights, input_size, stages, granularity, remove_downsamplings, num_classes, as_json, **routing_options):
    """Print the stem, stages and head that rmn-fx finds in MODEL.

    With a conversion option (--routing, --branches, ...) it also converts MODEL and shows
    each part's parameters and FLOPs per sample after conversion, against the base's.

    \b
    Examples:
      rmn-fx inspect resnet50
      rmn-fx inspect resnet50 --routing gate --top-k 1
      rmn-fx inspect vit_small_patch16_224 --stages blocks.0:blocks.5,blocks.6:blocks.11
    """
    from rmn_fx.conversion import analyze
    from rmn_fx.nn.rules import RoutingConfig
    from rmn_fx.tracing import describe_left_out

    net, input_size = build(model, num_classes, weights, input_size)
    anatomy = analyze(net, stages, input_size, remove_downsamplings=remove_downsamplings or 0, granularity=granularity)
    rows = anatomy.parts()
    asked = [name for name in CONVERSION_PARAMS if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
    routing = _routed_costs(net, anatomy, stages, granularity, remove_downsamplings or 0, rows, **routing_options) if asked else None
    if as_json:
        left_out = [{"module": path, "params": count} for path, count in anatomy.left_out]
        click.echo(json.dumps({"model": model, "input_size": anatomy.input_size, "capture": anatomy.capture, "routing": routing, "parts": rows, "left_out": left_out}, indent=2))
        return
    click.echo(f"{model}  input {'x'.join(map(str, anatomy.input_size))}  {len(anatomy.stages)} {granularity}s  captured by {anatomy.capture}")
    routed_header = f" {'routed params':>14} {'FLOPs x':>7}" if routing else ""
    header = f"{'part':<9} {'in':>16} {'out':>16} {'params':>12} {'FLOPs':>6}{routed_header}  modules"
    click.echo(header)
    click.echo("-" * len(header))
    for row in rows:
        modules = row["modules"]
        shown = ", ".join(modules if len(modules) <= 4 else modules[:2] + ["...", modules[-1]])
        routed = f" {row['routed_params']:>14,} {_ratio(row['routed_flops_per_sample'], row['flops_per_sample']):>7}" if routing else ""
        click.echo(
            f"{row['part']:<9} {_shape(row['in_shape']):>16} {_shape(row['out_shape']):>16} "
            f"{row['params']:>12,} {row['flops_share']:>6.1%}{routed}  {shown}"
        )
    ranges = anatomy.stage_ranges()
    click.echo(f"as --stages: {ranges}" if ranges else "(these stages hold function calls only; they cannot be written as --stages)")
    if anatomy.left_out:
        click.echo(f"left out: {describe_left_out(anatomy.left_out)}")
    if routing:
        click.echo(
            f"{RoutingConfig(**routing['config']).describe()}, N = {routing['config']['branches']}: parameters {routing['base_params']:,} -> "
            f"{routing['routed_params']:,} ({routing['routed_params'] / routing['base_params']:.2f}x), FLOPs per sample "
            f"{routing['base_flops_per_sample']:.4g} -> {routing['routed_flops_per_sample']:.4g} ({_ratio(routing['routed_flops_per_sample'], routing['base_flops_per_sample'])})"
        )


def _routed_costs(net, anatomy, stages, granularity, remove_downsamplings, rows, routing, branches, top_k, attention, routed, memory_momentum) -> dict:
    """Convert as asked; add each part's routed parameters and FLOPs per sample to `rows`
    (and the base's FLOPs per sample); return the totals and the routing."""
    from rmn_fx.conversion import left_out_said_elsewhere, transform
    from rmn_fx.measure import part_costs

    with left_out_said_elsewhere():  # inspect prints it
        gm = transform(
            net, branches, attention, stages, routed, list(anatomy.input_size), memory_momentum,
            remove_downsamplings=remove_downsamplings, routing=routing, top_k=top_k, granularity=granularity,
        )
    base, converted = part_costs(anatomy.graph_module, anatomy.sample), part_costs(gm, anatomy.sample)
    for row in rows:
        row["flops_per_sample"] = base[row["part"]][1]
        row["routed_params"], row["routed_flops_per_sample"] = converted[row["part"]]
    return {
        "config": gm.meta["rmn_fx"]["routing"],
        "routed": gm.meta["rmn_fx"]["routed"],
        "base_params": sum(p for p, _ in base.values()),
        "routed_params": sum(p for p, _ in converted.values()),
        "base_flops_per_sample": sum(f for _, f in base.values()),
        "routed_flops_per_sample": sum(f for _, f in converted.values()),
    }


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference else "-"


def _shape(shape) -> str:
    """8x32x32, or 8x32x32+8x16x16 for tensors packed at a boundary."""
    if not shape:
        return "-"
    if isinstance(shape[0], list):
        return "+".join(map(_shape, shape))
    return "x".join(map(str, shape))
