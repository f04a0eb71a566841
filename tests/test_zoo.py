"""Real torchvision and timm models: conversion properties and stages against timm's oracle.

The default run checks a few models of different designs (a segmentation and a video
model among them); `pytest -m zoo` sweeps every torchvision classification, segmentation,
video and quantization model and the timm architectures of benchmarks/zoo.py.
"""

from __future__ import annotations

import math

import pytest
import timm
import torchvision

import rmn_fx
from rmn_fx.models import torchvision_names
from rmn_fx.zoo import SIDES, TIMM_MODELS, check, check_detector

PAPER = {  # N = 8 with attention, 224x224, ImageNet classes (rmn-method.md)
    "resnet18": 89.9e6,
    "resnet50": 190.7e6,
    "vgg16": 241.1e6,
    "efficientnet_b0": 33.5e6,
}
QUICK_TORCHVISION = ["resnet18", "mobilenet_v3_small", "densenet121", "shufflenet_v2_x0_5", "squeezenet1_1", "inception_v3", "lraspp_mobilenet_v3_large", "r3d_18"]
QUICK_TIMM = ["convnext_atto", "regnetx_002", "swin_tiny_patch4_window7_224", "vit_tiny_patch16_224"]
LARGE = 250e6  # parameters: a conversion check of such a model peaks above 10 GB, so it runs alone (`large`)


def torchvision_sweep(*tasks: str) -> list:
    """Every model of torchvision's `tasks` lists; those with more than LARGE parameters (by
    their weights' metadata, no download) marked `large`."""
    return [
        pytest.param(name, marks=pytest.mark.large) if torchvision_parameters(name) > LARGE else name
        for task in tasks for name in torchvision_names(task)
    ]


def torchvision_parameters(name: str) -> int:
    return max((weights.meta.get("num_params", 0) for weights in torchvision.models.get_model_weights(name)), default=0)


def assert_properties(row: dict) -> None:
    assert row["status"] == "ok", row["error"]
    assert row["max_relative_error"] <= 1e-5  # right after conversion
    assert row["routed_relative_error"] <= 1e-5  # with the batch split over the procedures
    assert row["converted_params"] == row["expected_params"]
    assert row["converted_flops_per_sample"] == row["expected_flops_per_sample"]
    if row["input"] >= 224:  # attention's cost does not shrink with the image, convolutions' does
        assert row["flops_ratio"] < 1.01


@pytest.mark.parametrize("name", QUICK_TORCHVISION)
def test_torchvision_models(name):
    assert_properties(check(f"torchvision:{name}", branches=2, sides=(64, 128, 224)))


@pytest.mark.parametrize("name", QUICK_TIMM)
def test_timm_models(name):
    assert_properties(check(f"timm:{name}", branches=2, sides=None))


def test_a_detector_runs_with_its_backbone_converted():
    """What the error for detector names advises: the backbone's dict of feature maps keeps
    its names, so the detector runs, and right after conversion its detections are the
    base's, also with the images spread over the procedures."""
    import torch
    import torchvision

    from rmn_fx.measure import spread_routes

    torch.manual_seed(0)
    detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, box_score_thresh=0.0).eval()
    images = [torch.rand(3, 240, 320), torch.rand(3, 320, 288)]
    with torch.no_grad():
        want = detector(images)
    body = detector.backbone.body
    converted = rmn_fx.transform(body, branches=2, input_size=(3, 320, 320))
    x = torch.randn(2, 3, 320, 320)
    spread_routes(converted, x)
    assert list(converted(x)) == list(body(x))  # the feature maps' names
    detector.backbone.body = converted
    with torch.no_grad():
        got = detector(images)
    assert all(len(d["boxes"]) for d in want)
    for a, b in zip(want, got):
        assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


@pytest.mark.zoo
@pytest.mark.parametrize("name", torchvision_names("detection"))
def test_every_torchvision_detector_runs_with_its_backbone_converted(name):
    """`benchmarks/zoo.py --task detection`: the backbone's conversion properties, and the
    detector's boxes with the converted backbone put back and the images spread."""
    row = check_detector(name, branches=2)
    assert_properties(row)
    assert row["detections"] > 0 and row["detections_relative_error"] <= 1e-4


OTHER_RULES = [("gate", 1), ("gate", 2), ("cross-connections", None), ("cross-prediction", None)]


@pytest.mark.zoo
@pytest.mark.parametrize("rule, top_k", OTHER_RULES, ids=[f"{r}-{k}" if k else r for r, k in OTHER_RULES])
@pytest.mark.parametrize("name", [f"torchvision:{n}" for n in QUICK_TORCHVISION] + [f"timm:{n}" for n in QUICK_TIMM])
def test_every_rule_on_models_of_every_design(name, rule, top_k):
    """N = 2: the function, parameters and FLOPs the rule predicts, exactly."""
    row = check(name, 2, SIDES if not name.startswith("timm:") else None, routing=rule, top_k=top_k)
    assert row["status"] == "ok", row["error"]
    assert row["max_relative_error"] <= 1e-5 and row["routed_relative_error"] <= 1e-5
    assert row["converted_params"] == row["expected_params"]
    assert row["converted_flops_per_sample"] == pytest.approx(row["expected_flops_per_sample"], rel=1e-12)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_parameter_counts_match_the_paper(name):
    gm = rmn_fx.transform(name, branches=8, attention=True, verify=False)
    ours = sum(p.numel() for p in gm.parameters())
    assert abs(ours - PAPER[name]) / PAPER[name] < 0.005, f"{name}: {ours / 1e6:.2f}M vs paper {PAPER[name] / 1e6}M"


def nominal_reduction(side: int, stage, end: str = "out") -> int:
    """The downsampling factor at the stage's output (or input: `end` "in"), rounded to a
    power of two (299 / 8 -> 32)."""
    layout, shape = (stage.out_layout, stage.out_shape) if end == "out" else (stage.in_layout, stage.in_shape)
    measured = side / layout.resolution(shape) ** 0.5
    return 2 ** round(math.log2(measured))


def assert_feature_info_levels_end_stages(name: str) -> None:
    """Every feature level timm lists past our stem ends one of our stages, at its reduction.
    (rmn-fx may find more stages: a block at the stem's resolution, a deep stem's convs.)"""
    model = timm.create_model(name)
    anatomy = rmn_fx.analyze(model, input_size=model.pretrained_cfg["input_size"])
    side = anatomy.input_size[-1]
    stem = anatomy.graph_module.meta["rmn_part_modules"]["stem"]
    ours = [(nominal_reduction(side, s), s.modules) for s in anatomy.stages]
    known = {path for path, _ in model.named_modules()}
    for info in model.feature_info:
        module = info["module"]
        if any(module == m or module.startswith(m + ".") for m in stem):
            continue
        if module not in known:  # a name of timm's own feature hooks (HRNet's 'stem', 'stage1'): the level alone
            first = nominal_reduction(side, anatomy.stages[0], end="in")
            assert info["reduction"] in {first, *(r for r, _ in ours)}, f"{name}: timm level {info['reduction']} ({module}) is none of ours"
            continue
        assert any(
            _level_ends_stage(info["reduction"], module, reduction, modules) for reduction, modules in ours
        ), f"{name}: timm level {info['reduction']} at {module} ends none of {ours}"


def _level_ends_stage(level: int, module: str, reduction: int, modules) -> bool:
    """A level ends a stage when its module is (in) one of the stage's modules at the same
    reduction, or taps inside a block before the block's own stride (timm's Xception)."""
    whole = any(module == m or m.startswith(module + ".") for m in modules)
    inside = any(module.startswith(m + ".") for m in modules)
    return ((whole or inside) and reduction == level) or (inside and reduction == 2 * level)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "convnext_atto", "regnetx_002", "densenet121", "swin_tiny_patch4_window7_224"])
def test_stages_agree_with_timm_feature_info(name):
    assert_feature_info_levels_end_stages(name)


@pytest.mark.zoo
@pytest.mark.parametrize("name", torchvision_sweep("classification", "segmentation", "video", "quantization"))
def test_every_torchvision_model(name):
    assert_properties(check(f"torchvision:{name}", branches=2, sides=(64, 128, 224)))


@pytest.mark.zoo
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_zoo_converts_or_fails_clearly(name):
    row = check(f"timm:{name}", branches=2, sides=None)
    if row["status"] != "ok":  # a clear one-line error of the tracer or the stage analysis
        assert row["status"] in {"TraceError", "StageError", "NoDownsamplingError", "InputSizeError"}
        assert "\n" not in row["error"]
        return
    assert_properties(row)


ORACLE_MODELS = [n for n in TIMM_MODELS if not n.startswith(("vit_", "deit_"))]  # no downsampling: no levels to find


@pytest.mark.zoo
@pytest.mark.parametrize("name", ORACLE_MODELS)
def test_timm_zoo_stages_agree_with_feature_info(name):
    assert_feature_info_levels_end_stages(name)
