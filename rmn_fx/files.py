"""File helpers: fail early on unwritable paths, write atomically, read torch files safely."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

import torch

from .errors import OutputPathError, RMNError, first_line


def check_writable(path: str) -> None:
    """Fail before any work if `path` cannot be written: probe its directory with a real file."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise OutputPathError(f"output path '{path}' is a directory; give a file name such as model.pt")
    if not os.path.isdir(directory):
        raise OutputPathError(f"directory '{directory}' does not exist; create it or choose another output path")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".rmn-fx-probe-"):
            pass
    except OSError as exc:
        raise OutputPathError(f"cannot write to directory '{directory}' ({exc.strerror}); choose a writable output path") from exc


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call `write(staged)`, where `staged` has `path`'s name inside a fresh hidden folder
    beside it; then move what `write` made there into place, `path` itself last. Writers
    that add companion files (ONNX's external weights, `model.onnx.data`) land whole, a
    reader never sees a partial file, and a failure leaves nothing behind."""
    check_writable(path)
    directory, name = os.path.split(os.path.abspath(path))
    staging = tempfile.mkdtemp(dir=directory, prefix=f".{name}.")
    try:
        write(os.path.join(staging, name))
        companions = sorted(set(os.listdir(staging)) - {name})
        for file in [*companions, name]:
            os.replace(os.path.join(staging, file), os.path.join(directory, file))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def read_torch_file(path: str, error: type[RMNError], kind: str, hint: str):
    """`torch.load(path, weights_only=True)` on the CPU; a missing or unreadable file raises
    `error` with a one-line message (`kind` names the file for the user, `hint` the fix)."""
    if not os.path.isfile(path):
        raise error(f"{kind} '{path}' does not exist; {hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise error(f"cannot read {kind} '{path}' (corrupt or truncated? {first_line(exc)}); {hint}") from exc
