"""`rmn-fx export`: a converted model as a torch.export program (.pt2) or an ONNX model."""

from __future__ import annotations

import click

from .options import BatchSizes, ExportFormat, trust_factory_option


@click.command()
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="File to write: NAME.pt2 (torch.export) or NAME.onnx.")
@click.option("--format", "fmt", type=ExportFormat(), help="The export format [default: from the output's suffix].")
@click.option("--check", is_flag=True, help="Before writing, compare the exported model with eager PyTorch on random batches (--batches); write only if they agree.")
@click.option("--batches", type=BatchSizes(), default="1,2,7,64", show_default=True, help="Batch sizes of --check.")
@trust_factory_option
def export(model_file, output, fmt, check, batches, trust_factory):
    """Export a converted model for deployment, at inference (eval mode), batch axis dynamic.

    The routes stay in the exported graph: each sample still runs through its own
    procedure per stage (k for a top-k gate), as in PyTorch.

    \b
    Examples:
      rmn-fx export model.pt -o model.onnx                  # ONNX Runtime: input 'input', output 'logits'
      rmn-fx export model.pt -o model.pt2                   # torch.export.load, AOTInductor, ExecuTorch
      rmn-fx export model.pt -o model.onnx --check          # parity with eager PyTorch first
    """
    from rmn_fx.deploy import (
        TOLERANCE,
        check_parity,
        example_input,
        export,
        format_of_path,
        get_format,
        write_artifact,
    )
    from rmn_fx.errors import ExportError
    from rmn_fx.files import check_writable
    from rmn_fx.serialization import load

    form = get_format(fmt or format_of_path(output))
    check_writable(output)
    model = load(model_file, trust_factory=trust_factory)
    artifact = export(model, form.name)
    if check:
        rows = check_parity(model, form.runner(artifact), example_input(model), batches)
        click.echo(f"parity with eager PyTorch ({form.name}), max |eager - exported| / max |eager|, tolerance {TOLERANCE:g}:")
        for row in rows:
            click.echo(f"  batch {row.batch:>4}: {row.relative_error:.2e}  {'ok' if row.ok else 'FAILED'}  procedures used per stage: {row.procedures_used}")
        failed = [row.batch for row in rows if not row.ok]
        if failed:
            raise ExportError(f"the exported model differs from eager PyTorch at batch sizes {failed}; nothing written (please report this bug)")
    write_artifact(artifact, form.name, output)
    click.echo(f"wrote {output} ({form.description})")
