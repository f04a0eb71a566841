"""`rmn-fx eval`: accuracy and routing statistics of a saved model on a test set."""

from __future__ import annotations

import torch

import rmn_fx

from .batches import evaluation_batches
from .builders import pick_device
from .data import DataError, load_data
from .distributed import Group
from .loop import evaluate
from .statistics import at_chance, routing_summary


def evaluate_file(path: str, data_spec: str, batch_size: int = 256, device: str = "auto", trust_factory: bool = False) -> dict:
    """Load `path` (an rmn-fx model file) and evaluate it on the test split of `data_spec`."""
    target = pick_device(device)
    model = rmn_fx.load(path, map_location=target, trust_factory=trust_factory)
    _, height, _ = model.meta["rmn_fx"]["input_size"]
    data = load_data(data_spec, height)
    with torch.no_grad():
        outputs = model(data.test[0][0].unsqueeze(0).to(target)).shape[-1]
    if outputs != len(data.classes):
        raise DataError(f"'{path}' predicts {outputs} classes, but {data_spec} has {len(data.classes)}; evaluate on the data it was trained for")
    batches = evaluation_batches(data.test, batch_size, Group(), 0, target)
    contexts = data.test_contexts.split(batch_size) if data.test_contexts is not None else None
    summary, counts = evaluate(model, batches, len(data.classes), contexts, len(data.context_names), target, desc="test")
    return {
        **summary,
        "at_chance": at_chance(summary),
        "model_file": path,
        "data": data_spec,
        **routing_summary(counts),
    }
