"""Export formats, by name (a new format is one `Format` entry): how an ExportedProgram
becomes the artifact, how the artifact is written, and how it is run for a parity check."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from rmn_fx.errors import ExportError

INPUT_NAME, OUTPUT_NAME, BATCH_AXIS = "input", "logits", "batch"  # the ONNX graph's names


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    description: str
    convert: Callable[[torch.export.ExportedProgram], object]  # ExportedProgram -> artifact
    save: Callable[[object, str], None]
    runner: Callable[[object], Callable[[torch.Tensor], torch.Tensor]]  # artifact -> x -> output
    requires: tuple[str, ...] = ()  # modules the format needs (the `export` extra)


def _pt2_runner(program: torch.export.ExportedProgram):
    module = program.module()
    return lambda x: module(x)


def _to_onnx(program: torch.export.ExportedProgram):
    from .onnx_branches import skip_empty_procedures

    onnx_program = torch.onnx.export(program, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamo=True, verbose=False)
    _name_batch_axis(onnx_program.model, BATCH_AXIS)
    skip_empty_procedures(onnx_program.model)
    return onnx_program


def _name_batch_axis(model, name: str) -> None:
    """Rename the input's first symbolic dimension (torch.export's `s31`) to `name`,
    wherever the graph uses it, as ONNX models usually call their batch axis."""
    import onnx_ir as ir

    symbol = model.graph.inputs[0].shape[0]
    if not isinstance(symbol, ir.SymbolicDim):
        return
    values = [*model.graph.inputs, *model.graph.outputs, *(v for node in model.graph.all_nodes() for v in node.outputs)]
    for value in values:
        for i, dim in enumerate(value.shape or ()):
            if isinstance(dim, ir.SymbolicDim) and dim.value == symbol.value:
                value.shape[i] = ir.SymbolicDim(name)


# protobuf serializes at most 2 GiB, so heavier weights go to an external file (64 MiB left for the graph)
ONNX_INLINE_WEIGHT_LIMIT = 2**31 - 2**26


def _onnx_weight_bytes(model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _save_onnx(onnx_program, path: str) -> None:
    """Write one .onnx file, or, past protobuf's 2 GiB, the graph there and the weights
    beside it in `<name>.data` (ONNX's external data; ONNX Runtime finds it by that name)."""
    import onnx_ir as ir

    external = _onnx_weight_bytes(onnx_program.model) > ONNX_INLINE_WEIGHT_LIMIT
    ir.save(onnx_program.model, path, external_data=f"{os.path.basename(path)}.data" if external else None)


def _onnx_runner(onnx_program):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the threads eager PyTorch would use
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads leave the cores to whatever runs next
    folder = None
    if _onnx_weight_bytes(onnx_program.model) > ONNX_INLINE_WEIGHT_LIMIT:  # too big for one protobuf: the session reads the files
        folder = tempfile.TemporaryDirectory(prefix="rmn-fx-onnx-")
        source = os.path.join(folder.name, "model.onnx")
        _save_onnx(onnx_program, source)
    else:
        source = onnx_program.model_proto.SerializeToString()
    session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor, _files=folder) -> torch.Tensor:  # the files live as long as the runner (the session may map them)
        return torch.from_numpy(np.asarray(session.run(None, {name: x.detach().cpu().numpy()})[0]))

    return run


FORMATS = {
    f.name: f
    for f in (
        Format("pt2", ".pt2", "a torch.export ExportedProgram (torch.export.load; AOTInductor, ExecuTorch)", lambda p: p, lambda p, path: torch.export.save(p, path), _pt2_runner),
        Format("onnx", ".onnx", "an ONNX model (ONNX Runtime), input 'input', output 'logits', dynamic axis 'batch'", _to_onnx, _save_onnx, _onnx_runner, ("onnx", "onnxscript", "onnx_ir", "onnxruntime")),
    )
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ExportError(f"unknown export format {name!r}; choose one of: {', '.join(FORMATS)}")
    fmt = FORMATS[name]
    missing = [m for m in fmt.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"the {name} format needs {', '.join(missing)}; install them with: pip install 'rmn-fx[export]'")
    return fmt


def format_of_path(path: str) -> str:
    """The format a file name asks for, by its suffix."""
    for fmt in FORMATS.values():
        if path.endswith(fmt.suffix):
            return fmt.name
    suffixes = " or ".join(f.suffix for f in FORMATS.values())
    raise ExportError(f"cannot tell the export format of '{path}' from its suffix; end the name with {suffixes}, or pass --format")
