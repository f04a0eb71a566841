"""Shared test helpers: the console script, routing control and the parameter/FLOP
accounting of the method."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_cnn
from torch import nn

import rmn_fx
from rmn_fx.measure import relative_error as max_relative_error  # noqa: F401 - re-exported for tests
from rmn_fx.measure import spread_routes
from rmn_fx.nn.routed_stage import routed_stages

TESTS = Path(__file__).parent
CONSOLE_SCRIPT = Path(sys.executable).with_name("rmn-fx")  # the venv's, as a user runs it
CONSOLE_ENV = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}  # tiny_models importable


def console(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`rmn-fx ARGS...` in a fresh process."""
    return subprocess.run([str(CONSOLE_SCRIPT), *args], capture_output=True, text=True, env=CONSOLE_ENV, timeout=timeout)


def torchrun(processes: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=PROCESSES -m rmn_fx ARGS...` in a fresh process."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "rmn_fx"]
    return subprocess.run([*launcher, *args], capture_output=True, text=True, env=CONSOLE_ENV, timeout=timeout)


def trained_run(folder: Path, *args: str) -> Path:
    """`rmn-fx train ARGS... -o FOLDER/run`, which must succeed; the run directory."""
    run = folder / "run"
    done = console("train", *args, "-o", str(run))
    assert done.returncode == 0, done.stderr
    return run


def metrics(run: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (none before its first epoch ends)."""
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """Exit code 2 and one line `rmn-fx: error: ...` holding every needle, no traceback."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("rmn-fx: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def record_routes(gm: nn.Module) -> tuple[list[list[torch.Tensor]], list]:
    """Routes of every routed stage, appended at each forward; returns (routes, handles)."""
    routes: list[list[torch.Tensor]] = [[] for _ in routed_stages(gm)]
    handles = [
        s.router.register_forward_hook(lambda m, a, out, i=i: routes[i].append(out.detach()))
        for i, s in enumerate(routed_stages(gm))
    ]
    return routes, handles


def attention_params(channels: int, branches: int) -> int:
    hidden = max(1, channels // 16)
    return channels * hidden + hidden + (hidden + branches) * channels + channels


def attention_flops(channels: int) -> int:
    """FLOPs per sample of Conditional Attention's two linear layers (2 per multiply-add); the
    route's one-hot part of FC2 is a lookup, not a product."""
    hidden = max(1, channels // 16)
    return 2 * (channels * hidden + hidden * channels)


def rule_params(rule: str, options: dict, stage, branches: int, receives: bool, emits: bool) -> int:
    """Parameters a rule adds to a stage's N procedures, from the method's formulas (see the
    rule files): CA for memory, one linear layer for the gate, mixer and combiner for paths."""
    n, cin, cout = branches, stage.in_channels, stage.out_channels
    if rule == "memory":
        return attention_params(cout, n) if options.get("attention", True) else 0
    if rule == "gate":
        return cin * n + n
    hidden = max(cin // 16, n)
    mixer = (n * cin * hidden + hidden + hidden * n * n + n * n) if rule == "cross-connections" else n * (cin * hidden + hidden + hidden * n + n)
    return receives * mixer + (not emits) * (n * cout * n + n)


def rule_flops(rule: str, options: dict, stage, branches: int, receives: bool, emits: bool) -> int:
    """FLOPs per sample of a rule's own matrix products (linear layers and path weighting)."""
    n, cin, cout = branches, stage.in_channels, stage.out_channels
    d_in, d_out = math.prod(stage.in_shape[1:]), math.prod(stage.out_shape[1:])
    if rule == "memory":
        return attention_flops(cout) if options.get("attention", True) else 0
    if rule == "gate":
        return 2 * cin * n + 2 * options["top_k"] * d_out
    hidden = max(cin // 16, n)
    per_source = cin * hidden + hidden * n
    mixer = 2 * (n * cin * hidden + hidden * n * n) if rule == "cross-connections" else 2 * n * per_source
    return receives * (mixer + 2 * n * n * d_in) + (not emits) * (2 * n * cout * n + 2 * n * d_out)


def paths_per_sample(rule: str, options: dict, branches: int) -> int:
    return {"memory": 1, "gate": options.get("top_k", 1)}.get(rule, branches)


ROUTINGS = [  # (rule, options): every rule, and the gate with one and two procedures per sample
    ("memory", {"attention": True}),
    ("memory", {"attention": False}),
    ("gate", {"top_k": 1}),
    ("gate", {"top_k": 2}),
    ("cross-connections", {}),
    ("cross-prediction", {}),
]
ROUTING_IDS = [f"{rule}-{'-'.join(f'{k}={v}' for k, v in options.items())}".rstrip("-") for rule, options in ROUTINGS]
routings = pytest.mark.parametrize("rule, options", ROUTINGS, ids=ROUTING_IDS)


def convert(spec, branches, rule="memory", options=None, routed=None):
    """The base network, its conversion (rule weights drawn at random, not at their init)
    and an input batch; a video backbone in float64."""
    options = options or {}
    if rule == "gate":
        branches = max(branches, options["top_k"])
    base = spec.build().eval()
    if spec.frames is not None:  # float32 Conv3d kernels differ by up to 2e-5 between batch sizes: far from any routing effect in float64
        base = base.double()
    size = spec.input_size
    gm = rmn_fx.transform(base, branches=branches, routing=rule, input_size=size, routed=routed, **options).eval()
    x = torch.randn(max(branches, 3), *size, generator=torch.Generator().manual_seed(1), dtype=next(base.parameters()).dtype)
    if rule == "memory":
        spread_routes(gm, x)
    else:
        randomize_rule_weights(gm)
    return base, gm, x


def randomize_rule_weights(gm) -> None:
    """Draw every routing parameter (not the clones') from N(0, 1): far from any initialisation."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for stage in routed_stages(gm):
            for name, p in stage.named_parameters():
                if not name.startswith("procedures."):
                    p.copy_(torch.randn(p.shape, generator=generator))


SIZE = (3, 32, 32)  # tiny_cnn's input


def tiny_converted(rule: str, options: dict, branches: int = 4, granularity: str = "stage"):
    """tiny_cnn (BatchNorm everywhere) converted with `rule` (three routed parts; six at
    block granularity), its routes spread over every procedure, BatchNorm statistics and
    rule weights away from their initial values."""
    torch.manual_seed(0)
    base = tiny_cnn()
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    gm = rmn_fx.transform(base, branches=branches, routing=rule, input_size=SIZE, granularity=granularity, **options).eval()
    randomize_rule_weights(gm)
    spread_routes(gm, torch.randn(2 * branches, *SIZE, generator=torch.Generator().manual_seed(3)))
    return gm
