"""File helpers: fail early on unwritable paths, write atomically, read torch files safely."""

from __future__ import annotations

import os
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
    """Call `write(tmp_path)`, then rename it onto `path`; never leaves a partial file."""
    check_writable(path)
    directory, name = os.path.split(os.path.abspath(path))
    # hidden, and ending like `path` (writers that check the suffix, as torch.export.save does, accept it)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=f".tmp{os.path.splitext(name)[1]}")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the file should look like any other
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
