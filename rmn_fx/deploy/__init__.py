"""Deployment: export a converted model (torch.export's ExportedProgram, ONNX) with its
routes in the graph, so that each sample still runs through its own procedures.

    program = rmn_fx.export(gm, format="pt2")             # or "onnx"; path= writes the file
    rows = rmn_fx.deploy.check_parity(gm, rmn_fx.deploy.FORMATS["onnx"].runner(program), example)

How: under an exporter the routed stages dispatch without a host sync (`nonzero` per
procedure, `index_select`, the procedure on its data-dependent sub-batch; one gather puts
the concatenated outputs back in batch order),
and the norms that branch on such a sub-batch's size run in a form that does not
(`subbatch_ops.ExportableOps`: BatchNorm as its inference affine map, a roll as a gather). In ONNX each procedure
then sits in an `If` on having samples (`onnx_branches`), so an empty one runs no kernel.
"""

from __future__ import annotations

from .formats import FORMATS, Format, format_of_path, get_format
from .parity import TOLERANCE, ParityRow, check_parity
from .program import example_input, export_program

__all__ = ["FORMATS", "TOLERANCE", "Format", "ParityRow", "check_parity", "example_input", "export", "export_program", "format_of_path", "get_format", "write_artifact"]


def export(model, format: str = "pt2", path: str | None = None, input_size=None):
    """Export `model` (a converted model, or any module with `input_size`) at inference.

    Returns the artifact: a `torch.export.ExportedProgram` ("pt2") or a
    `torch.onnx.ONNXProgram` ("onnx"). With `path`, also writes it there (`write_artifact`)."""
    from ..files import check_writable

    fmt = get_format(format)
    if path is not None:
        check_writable(path)  # before the export's tens of seconds
    artifact = fmt.convert(export_program(model, example_input(model, input_size)))
    if path is not None:
        write_artifact(artifact, format, path)
    return artifact


def write_artifact(artifact, format: str, path: str) -> None:
    """Write an artifact of `export` to `path` atomically (nothing is left if it fails)."""
    from ..files import atomic_write

    atomic_write(path, lambda tmp: get_format(format).save(artifact, tmp))
