"""Two mechanics every analysis and loop needs, written once: run a module in a given
train/eval mode and restore the caller's mode afterwards, and remove hooks however the
block ends."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle


@contextlib.contextmanager
def training_mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """`module` in train (True) or eval (False) mode inside the block, its own mode after."""
    was_training = module.training
    module.train(training)
    try:
        yield module
    finally:
        module.train(was_training)


@contextlib.contextmanager
def hooks(handles: Iterable[RemovableHandle]) -> Iterator[None]:
    """Remove `handles` (forward hooks, pre-hooks) when the block ends."""
    handles = list(handles)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
