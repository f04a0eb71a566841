"""The model zoo rmn-fx is checked on, and the check itself: convert one model and
measure the conversion properties (function, parameters and FLOPs against the anatomy's
prediction, the routed samples against the base run per sample). Used by the zoo sweeps
(`benchmarks/zoo.py`, `pytest -m zoo`)."""

from __future__ import annotations

import gc
import time

import torch

from .conversion import transform
from .errors import InputSizeError, NoDownsamplingError, RMNError, first_line
from .measure import compare, relative_error, samples_together, spread_routes
from .models import create_model, default_input_size
from .passes.find_stages import suggest_stage_ranges

# One or more architectures per timm family, the smallest variant of each.
TIMM_MODELS = [
    "resnet18", "resnet50d", "seresnet50", "resnext26ts", "regnetx_002", "regnety_002",
    "efficientnet_b0", "efficientnetv2_rw_t", "mobilenetv2_050", "mobilenetv3_small_050",
    "mobilenetv4_conv_small", "convnext_atto", "densenet121", "dla34", "ghostnet_100",
    "rexnet_100", "res2net50_14w_8s", "cspresnet50", "cspdarknet53", "dpn68", "ese_vovnet19b_dw",
    "nf_resnet26", "repvgg_a0", "hrnet_w18_small", "swin_tiny_patch4_window7_224",
    "maxvit_nano_rw_256", "coatnet_nano_rw_224", "mixnet_s", "fbnetc_100", "lcnet_050",
    "mnasnet_050", "resnest14d", "skresnet18", "selecsls42b", "inception_v3", "inception_v4",
    "xception41", "gernet_s", "edgenext_xx_small", "mobilevit_xxs", "fastvit_t8",
    "efficientvit_b0", "tiny_vit_5m_224", "pvt_v2_b0", "poolformer_s12", "levit_128s",
    "hgnet_tiny", "starnet_s1", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
]
SIDES = (64, 128, 224)  # torchvision models are checked at the smallest side they accept
DETECTOR_SIDE = 192  # the side detectors resize their images to in the sweep (SSD keeps its fixed size)
SMALL = ("tiny", "nano", "pico", "atto", "femto", "small", "_s", "xxs", "xs", "b0", "050", "18", "lite")


def one_per_family() -> list[str]:
    """One model per timm module, preferring names that mark a small variant."""
    import timm

    picks = []
    for family in timm.list_modules():
        names = timm.list_models(module=family)
        if names:
            picks.append(min(names, key=lambda n: (not any(t in n for t in SMALL), len(n))))
    return picks


def convert_for_sweep(name: str, branches: int, sides, **rule) -> tuple[torch.nn.Module, object, tuple[int, ...], object]:
    """Build `name` and convert it as the sweeps do: at the model's own input size (`sides`
    None) or at the first height and width of `sides` it accepts (a video keeps its
    frames); a model without a downsampling gets the suggested named stages. Returns
    (base, converted, input size, named stages or None)."""
    base = create_model(name).eval()
    own = default_input_size(base, name)
    sizes = [own] if sides is None else [(*own[:-2], s, s) for s in sides]
    named = None
    for i, size in enumerate(sizes):
        try:
            try:
                return base, transform(base, branches=branches, input_size=size, **rule), size, named
            except NoDownsamplingError:
                named = suggest_stage_ranges(base)
                if named is None:
                    raise
                return base, transform(base, branches=branches, input_size=size, stages=named, **rule), size, named
        except InputSizeError:
            if i == len(sizes) - 1:
                raise
    raise AssertionError("unreachable: no input size given")


def check(name: str, branches: int, sides, routing: str = "memory", top_k: int | None = None, granularity: str = "stage") -> dict:
    """Convert `name` with `routing` at `granularity` and measure it; an RMNError is a
    result too (its message is kept)."""
    row = {"model": name, "routing": routing, "top_k": top_k, "granularity": granularity, "status": "ok", "stages": None, "input": None, "named_stages": None, "capture": None, "error": ""}
    start = time.perf_counter()
    try:
        row.update(_measure(name, branches, sides, routing=routing, top_k=top_k, granularity=granularity))
    except RMNError as exc:
        row.update(status=type(exc).__name__, error=str(exc))
    except Exception as exc:  # noqa: BLE001 -- a bug (ours or the measurement's): recorded, and failing the sweep
        row.update(status="crash", error=f"{type(exc).__name__}: {first_line(exc)}")
    row["seconds"] = round(time.perf_counter() - start, 2)
    gc.collect()  # GraphModules hold reference cycles: free this model's copies before a sweep builds the next
    return row


def _measure(name: str, branches: int, sides, **rule) -> dict:
    base, gm, size, named = convert_for_sweep(name, branches, sides, **rule)
    x = torch.randn(branches, *size, generator=torch.Generator().manual_seed(0))
    return {
        **compare(base, gm, x),
        "named_stages": named,
        "capture": gm.meta["rmn_fx"]["capture"],
        "stages": len(gm.meta["rmn_stages"]),
        "input": size[-1],
        "routed_relative_error": routed_error(base, gm, x, rule["routing"]),
    }


@torch.no_grad()
def routed_error(base, gm, x: torch.Tensor, routing: str) -> float:
    """The converted model with its samples spread over the procedures, against the base
    model run on each sample alone. Memory routing: the memories are pointed at the
    samples' keys, so the whole batch runs as one-sample sub-batches, one per procedure.
    Other rules route by their random initial gates into sub-batches of any size, and a
    network's float output moves with the batch size (up to 1e-4 for a random
    EfficientNetV2), so their samples run alone too, each through its procedures."""
    alone = samples_together([base(x[i : i + 1]) for i in range(x.shape[0])])
    if routing == "memory":
        spread_routes(gm, x)
        return relative_error(alone, gm(x))
    return relative_error(alone, samples_together([gm(x[i : i + 1]) for i in range(x.shape[0])]))


def detector_backbone(detector: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The path and module of a torchvision detector that maps a batch of images to its
    dict of feature maps: the body below an FPN (Faster/Mask/Keypoint R-CNN, RetinaNet,
    FCOS), else the backbone itself (SSD's and SSDlite's feature extractors)."""
    backbone = detector.backbone
    return ("backbone.body", backbone.body) if hasattr(backbone, "body") else ("backbone", backbone)


def check_detector(name: str, branches: int) -> dict:
    """Convert the backbone of the torchvision detector `name` (`detector_backbone`), put it
    back, and measure: the backbone's conversion properties as `check` does, and the
    detections of two images against the base detector's, with the images spread over the
    procedures. An RMNError is a result too."""
    row = {"model": f"torchvision:{name}", "routing": "memory", "top_k": None, "granularity": "stage", "status": "ok", "stages": None, "input": None, "named_stages": None, "capture": None, "error": ""}
    start = time.perf_counter()
    try:
        row.update(_measure_detector(name, branches))
    except RMNError as exc:
        row.update(status=type(exc).__name__, error=str(exc))
    except Exception as exc:  # noqa: BLE001 -- a bug (ours or the measurement's): recorded, and failing the sweep
        row.update(status="crash", error=f"{type(exc).__name__}: {first_line(exc)}")
    row["seconds"] = round(time.perf_counter() - start, 2)
    gc.collect()
    return row


@torch.no_grad()
def _measure_detector(name: str, branches: int) -> dict:
    import torchvision

    torch.manual_seed(0)
    detector = torchvision.models.get_model(name, weights=None, weights_backbone=None).eval()
    resize = detector.transform
    if resize.fixed_size is None:  # R-CNN, RetinaNet, FCOS: images scaled to a side of DETECTOR_SIDE
        resize.min_size, resize.max_size = (DETECTOR_SIDE,), DETECTOR_SIDE
    side = resize.fixed_size[0] if resize.fixed_size else DETECTOR_SIDE
    getattr(detector, "roi_heads", detector).score_thresh = 0.0  # keep every box: more to compare
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, side, side, generator=generator) for _ in range(2)]
    want = detector(images)
    path, backbone = detector_backbone(detector)
    size = (3, side, side)
    converted = transform(backbone, branches=branches, input_size=size)
    x = torch.randn(branches, *size, generator=generator)
    row = {**compare(backbone, converted, x), "stages": len(converted.meta["rmn_stages"]), "input": side, "part": path, "capture": converted.meta["rmn_fx"]["capture"]}
    row["routed_relative_error"] = routed_error(backbone, converted, x, "memory")
    if list(converted(x)) != list(backbone(x)):
        raise AssertionError(f"the converted {path} renamed its feature maps")
    spread_routes(converted, torch.stack(images))  # each image through its own procedure
    detector.get_submodule(path.rpartition(".")[0]).register_module(path.rpartition(".")[2], converted)
    got = detector(images)
    row["detections"] = sum(len(d["boxes"]) for d in want)
    row["detections_relative_error"] = max(relative_error(a[k].float(), b[k].float()) for a, b in zip(want, got, strict=True) for k in a)
    return row


def max_error(r: dict) -> float:
    return max(r["max_relative_error"], r["routed_relative_error"])


def exact_row(r: dict) -> bool:
    """Parameters and FLOPs are exactly what the anatomy predicts."""
    return r["converted_params"] == r["expected_params"] and r["converted_flops_per_sample"] == r["expected_flops_per_sample"]
