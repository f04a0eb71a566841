"""The second capture path: models whose Python code branches on sizes (Gemma4's ViT)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rmn_fx
from rmn_fx.errors import OptionError, TraceError
from rmn_fx.tracing import CAPTURES, RMNTracer, trace
from tiny_models import tiny_cnn


class SizeBranching(nn.Module):
    """Branches on sizes the ways Gemma4's patch embedding does: on the input's rank, on
    whether its sides divide by a patch, with a loop over a size and a torch factory given
    the batch size; `on_values` branches on values instead, `on_batch` loops over the batch."""

    def __init__(self, on_values: bool = False, on_batch: bool = False) -> None:
        super().__init__()
        self.body = tiny_cnn()
        self.register_buffer("table", torch.linspace(0.0, 1.0, 3))
        self.on_values, self.on_batch = on_values, on_batch

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError("expected images")
        batch, _, height, width = x.shape
        if height % 4 or width % 4:
            raise ValueError("sides must divide by 4")
        for row in range(height // 16):  # a Python loop over a size: unrolled at the sample's
            x = x + row * 1e-3
        x = x + torch.ones(batch, 3, 1, 1) * self.table.view(1, 3, 1, 1).expand(batch, -1, -1, -1)
        if self.on_values and x.mean() > 0:
            x = -x
        if self.on_batch:
            x = torch.cat([x[i : i + 1] for i in range(batch)])
        return self.body(x)


def test_plain_fx_cannot_trace_it():
    with pytest.raises(Exception):
        RMNTracer().trace(SizeBranching())


def test_code_that_branches_on_sizes_is_captured_at_the_samples_and_converts_exactly(tmp_path):
    model = SizeBranching().eval()
    assert trace(model, torch.randn(2, 3, 32, 32)).meta["rmn_capture"] == CAPTURES[1]
    gm = rmn_fx.transform(model, branches=3, input_size=(3, 32, 32))  # verified on the sample inside
    assert gm.meta["rmn_fx"]["capture"] == CAPTURES[1]
    assert len(gm.meta["rmn_stages"]) == 3
    with torch.no_grad():
        for batch in (1, 3, 5):  # the batch size stays symbolic; the loop over sizes is unrolled
            x = torch.randn(batch, 3, 32, 32)
            torch.testing.assert_close(gm.eval()(x), model(x), rtol=0, atol=1e-6)
    rmn_fx.save(gm, tmp_path / "m.pt")
    loaded = rmn_fx.load(str(tmp_path / "m.pt"), model=SizeBranching())  # captured again, the same way
    assert loaded.code == gm.code
    torch.testing.assert_close(loaded(x), gm(x))


def test_a_branch_on_tensor_values_is_refused_with_the_line_that_takes_it():
    with pytest.raises(TraceError, match=r"torch.fx cannot trace .*, nor with the sample's sizes fixed: test_tracing.py:\d+ \(`if self.on_values and x.mean\(\) > 0:`\) uses node '\w+' as a condition, and its value comes from a tensor's values"):
        rmn_fx.analyze(SizeBranching(on_values=True), input_size=(3, 32, 32))


def test_code_that_depends_on_the_batch_size_is_refused():
    with pytest.raises(TraceError, match=r"nor with the sample's sizes fixed: its Python code branches on the batch size \(the graphs at batches 2 and 3 differ\)"):
        rmn_fx.analyze(SizeBranching(on_batch=True), input_size=(3, 32, 32))


def test_removing_downsamplings_needs_a_graph_that_runs_at_other_sizes():
    with pytest.raises(OptionError, match="remove_downsamplings needs a graph that runs at other input sizes"):
        rmn_fx.transform(SizeBranching(), branches=2, input_size=(3, 32, 32), remove_downsamplings=1)


def test_plain_fx_capture_is_kept_where_it_works():
    assert rmn_fx.transform(tiny_cnn(), branches=2, input_size=(3, 32, 32)).meta["rmn_fx"]["capture"] == CAPTURES[0]
