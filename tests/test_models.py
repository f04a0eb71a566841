"""Model names, weights files and the API's option checks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
import torchvision

import rmn_fx
from rmn_fx.errors import ModelNotFoundError, OptionError, WeightsError
from rmn_fx.models import create_model, default_input_size, load_weights


def test_names_resolve_to_torchvision_first_then_timm():
    assert isinstance(create_model("resnet18"), torchvision.models.ResNet)
    assert isinstance(create_model("timm:resnet18"), timm.models.ResNet)
    assert isinstance(create_model("resnet10t"), timm.models.ResNet)  # timm only
    assert create_model("resnet18", num_classes=7).fc.out_features == 7


def test_every_torchvision_list_resolves_by_name_with_random_weights():
    """Segmentation, video, detection, optical flow and quantization names too; every
    `weights*` argument (the backbone's included, which would download) is None."""
    import inspect

    from rmn_fx.models import TORCHVISION_TASKS, _builder, torchvision_tasks

    assert set(torchvision_tasks()) == set(torchvision.models.list_models())
    assert set(torchvision_tasks().values()) == set(TORCHVISION_TASKS)
    for name in torchvision_tasks():
        builder = _builder(name)
        weights = [p for p in inspect.signature(builder.func).parameters if p.startswith("weights")]
        assert weights and all(builder.keywords[p] is None for p in weights), name


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "r3d_18", "fasterrcnn_mobilenet_v3_large_320_fpn", "raft_small", "quantized_mobilenet_v2"])
def test_models_of_every_task_build_without_downloading(name, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", no_download)
    assert isinstance(create_model(name), torch.nn.Module)
    assert isinstance(create_model(f"torchvision:{name}"), torch.nn.Module)


def test_unknown_names_suggest_close_matches():
    with pytest.raises(ModelNotFoundError, match="did you mean .*convnext_tiny"):
        create_model("convnxt_tiny")


def test_input_size_comes_from_timm_config_or_torchvision_default():
    assert default_input_size(create_model("timm:resnet18")) == tuple(timm.create_model("resnet18").pretrained_cfg["input_size"])
    assert default_input_size(create_model("resnet18")) == (3, 224, 224)
    assert default_input_size(create_model("vit_h_14"), "vit_h_14") == (3, 224, 224)  # its weights' 518 is not its builder's


def test_dense_and_video_models_take_their_weights_preprocessing_size():
    """Read from the weights' metadata (nothing is downloaded); videos as C,T,H,W with 16
    frames, the clip length of torchvision's references."""
    assert default_input_size(create_model("fcn_resnet50"), "fcn_resnet50") == (3, 520, 520)
    assert default_input_size(create_model("r3d_18"), "torchvision:r3d_18") == (3, 16, 112, 112)
    assert default_input_size(create_model("s3d"), "s3d") == (3, 16, 224, 224)


def test_weights_mismatch_names_the_tensor(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(create_model("resnet18", num_classes=3).state_dict(), path)
    with pytest.raises(WeightsError, match="'fc.weight' is"):
        load_weights(create_model("resnet18"), str(path))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"branches": 0}, "branches"),
        ({"branches": 2.0}, "branches"),
        ({"branches": True}, "branches"),
        ({"momentum": 1.0}, "momentum"),
        ({"input_size": (3, 64)}, "input_size"),
        ({"input_size": (3, 2, 4, 64, 64)}, "C,T,H,W"),
        ({"routed": [0]}, "routed"),
        ({"num_classes": 3}, "num_classes"),
    ],
)
def test_api_rejects_bad_options(kwargs, needle):
    model = torchvision.models.resnet18()
    with pytest.raises(OptionError, match=needle):
        rmn_fx.transform(model, **({"input_size": (3, 64, 64)} | kwargs))


def test_converting_a_converted_model_is_refused():
    gm = rmn_fx.transform("resnet18", branches=2, input_size=(3, 64, 64))
    with pytest.raises(OptionError, match="already converted"):
        rmn_fx.transform(gm, branches=2, input_size=(3, 64, 64))


def test_transform_leaves_the_users_model_untouched():
    model = torchvision.models.resnet18().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = rmn_fx.transform(model, branches=2, input_size=(3, 64, 64))
    gm.train()(torch.randn(4, 3, 64, 64)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_only_the_chosen_stages_are_routed():
    gm = rmn_fx.transform("resnet18", branches=4, routed=[2, 4], input_size=(3, 64, 64))
    routed = [isinstance(gm.get_submodule(f"stage_{i}"), rmn_fx.RoutedStage) for i in range(1, 5)]
    assert routed == [False, True, False, True]
    assert gm.meta["rmn_fx"]["routed"] == [2, 4]


def test_top_level_code_reads_stem_stages_head():
    gm = rmn_fx.transform("resnet18", branches=2, input_size=(3, 64, 64))
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["stem", "stage_1", "stage_2", "stage_3", "stage_4", "head"]
    assert "self.stage_1(stem)" in gm.code


def test_installed_packages_do_not_claim_generic_names(tmp_path):
    """Outside the repository root every module imports (none reaches for a top-level
    `passes` or `recipes`), and no such generic name is installed."""
    code = (
        "import importlib, importlib.util as u, pkgutil, rmn_fx, rmn_fx.passes, rmn_fx.recipes;"
        "[importlib.import_module(m.name) for p in (rmn_fx, rmn_fx.passes, rmn_fx.recipes)"
        " for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.') if not m.name.endswith('__main__')];"
        "print(u.find_spec('passes') is None and u.find_spec('recipes') is None)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_double_precision_models_convert_in_their_dtype():
    model = torchvision.models.resnet18().double().eval()
    gm = rmn_fx.transform(model, branches=2, input_size=(3, 64, 64))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x))
    assert gm.stage_1.router.memory.dtype == gm.stage_1.attention.excite.weight.dtype == torch.float64


@pytest.mark.parametrize("training", [False, True])
def test_converted_model_keeps_the_mode_of_the_original(training):
    model = torchvision.models.resnet18().train(training)
    gm = rmn_fx.transform(model, branches=2, input_size=(3, 64, 64))
    assert all(m.training == training for m in gm.modules())
    assert model.training == training
