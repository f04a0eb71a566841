"""Under torch.compile, a routed part's own code runs eagerly and each procedure compiles alone.

A routed part's Python (key, route, dispatch, attention, the rule's weighting) is a few small
ops between large procedures, and its sub-batch sizes depend on the data, so a compiled
model breaks its graph there in any case. Left to dynamo, every function of that code would
be compiled as frames of its own: a guard check and a resume per frame (about 30 frames per
forward for EfficientNet-B0 at N = 8, the routed model 1.5-1.7x the compiled base at batch 1),
and since one code object serves every routed part, past torch's recompile limit (8
versions) the later parts were no longer compiled. So:
- a compiled caller breaks its graph where it calls a stage that dispatches (`graph_break_at`
  on the memory and gate rules' `forward`: the effect of `torch.compiler.disable`, without
  its wrapper, so torch.export still traces through the stage: it runs no dynamo frames);
  a multi-path stage runs every procedure on the whole batch and compiles into the
  caller's graph;
- every frame of the runtime package's code that runs as a frame of its own (past a graph
  break) runs eagerly (`eager_frames`), while the frames it calls, the procedures (fx
  GraphModules, code of their own per clone), compile each on its own with the caller's
  backend.
Eager runs, torch.export and torch.jit.trace do not see either mark.

Both marks are torch's own (`torch._dynamo.decorators.skip`, `eval_frame.skip_code`: what a
non-recursive `torch.compiler.disable` does); torch has no public name for them yet.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import pkgutil
import types
from collections.abc import Callable, Iterator

from torch._dynamo.decorators import skip as _skip_frame_and_break_graph
from torch._dynamo.eval_frame import skip_code as _skip_frame


def graph_break_at(function: Callable) -> Callable:
    """A copy of `function` (`RoutedStage.forward`, which the multi-path rules keep unmarked:
    every procedure runs on the whole batch, so they compile into the caller's graph) at
    which a compiled caller breaks its graph and runs it eagerly."""
    marked = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__, function.__closure__)
    marked.__kwdefaults__ = function.__kwdefaults__
    return _skip_frame_and_break_graph(functools.update_wrapper(marked, function))


def eager_frames(package: str) -> None:
    """Run every frame of `package`'s own code (functions, methods, the comprehensions and
    closures inside them) eagerly under torch.compile; frames they call still compile."""
    root = os.path.dirname(importlib.import_module(package).__file__)
    modules = [importlib.import_module(info.name) for info in pkgutil.walk_packages([root], package + ".")]
    for code in _code_objects([value for module in modules for value in vars(module).values()], package, root):
        _skip_frame(code)


def _code_objects(objects, package: str, root: str) -> Iterator[types.CodeType]:
    """The code objects in the folder `root` reachable from `objects`: functions, methods
    and properties of `package`'s classes, decorated functions' originals, nested code."""
    pending, seen = list(objects), set()
    while pending:
        obj = pending.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, types.CodeType):
            if obj.co_filename.startswith(root):
                yield obj
                pending.extend(c for c in obj.co_consts if isinstance(c, types.CodeType))
        elif inspect.isclass(obj):
            if obj.__module__.startswith(package):
                pending.extend(vars(obj).values())
        elif isinstance(obj, property):
            pending.extend(f for f in (obj.fget, obj.fset, obj.fdel) if f is not None)
        elif isinstance(obj, (staticmethod, classmethod)):
            pending.append(obj.__func__)
        elif inspect.isfunction(obj):
            pending.append(obj.__code__)
            if hasattr(obj, "__wrapped__"):
                pending.append(obj.__wrapped__)
