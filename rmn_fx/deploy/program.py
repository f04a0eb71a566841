"""torch.export of a routed model at inference: a dynamic batch axis, the routes in the graph."""

from __future__ import annotations

import contextlib
import io
import logging
import re

import torch
from torch import nn
from torch.export import Dim

from rmn_fx.errors import ExportError, first_line

from ..nn.modes import training_mode
from .subbatch_ops import ExportableOps

EXAMPLE_BATCH = 2  # not 1: torch.export would specialise the batch axis to the example's 0/1


def example_input(model: nn.Module, input_size=None) -> torch.Tensor:
    """A random example batch for `model`: `input_size` (C,H,W or C,T,H,W), else the size it was converted at."""
    if input_size is None:
        meta = getattr(model, "meta", {}).get("rmn_fx")
        if meta is None:
            raise ExportError("the model was not made by rmn-fx, so its input size is unknown; pass input_size=(C, H, W)")
        input_size = meta["input_size"]
    like = next(model.parameters(), torch.empty(0))
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return torch.randn(EXAMPLE_BATCH, *input_size, generator=torch.Generator().manual_seed(0)).to(like.device, dtype)


def export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """`torch.export` of `model` in eval mode (its own mode is restored), batch axis dynamic.

    Routed stages take their sync-free dispatch under the exporter; BatchNorm and GroupNorm
    run in their exportable form (`ExportableOps`). A model that still does not export raises
    ExportError with the exporter's reason."""
    batch = Dim("batch", min=1)
    with training_mode(model, False), ExportableOps(), torch.no_grad(), quiet_exporter():
        try:
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        except Exception as exc:  # the exporter's errors have no common base class
            where = failing_call(str(exc))
            raise ExportError(
                f"torch.export cannot capture this model: {type(exc).__name__}: {first_line(exc)}" + (f" at `{where}`" if where else "")
            ) from exc


@contextlib.contextmanager
def quiet_exporter():
    """Keep the exporter's own output (warnings, the partial graph it prints on failure)
    off the terminal: a failure is reported once, as an ExportError whose cause holds it all."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def failing_call(message: str) -> str | None:
    """The source line an exporter's message blames (its last quoted `File ..., line N` frame)."""
    frames = re.findall(r'File "[^"]+", line \d+, in \S+\n[ \t]+(\S.*)', message)  # the source line right below, if any
    return frames[-1].strip() if frames else None
