"""rmn-fx: compile torchvision/timm backbones into routed networks: Neural Routing by
Memory (RMN), multi-path cross-connections and cross-prediction, and learned top-k gates.

The errors are imported at once; everything that needs torch is imported on first use
(PEP 562), so that `import rmn_fx.cli` and `rmn-fx --version` stay fast.
"""

import importlib

from .errors import (
    ConversionError,
    ExportError,
    InputSizeError,
    ModelBuildError,
    ModelFileError,
    ModelNotFoundError,
    ModelTaskError,
    NoDownsamplingError,
    OptionError,
    OutputPathError,
    RMNError,
    StageError,
    TraceError,
    TrainingFailed,
    TrainingInterrupted,
    UntrustedCodeError,
    WeightsError,
)

__version__ = "0.1.0"

_LAZY = {
    "Anatomy": "conversion",
    "analyze": "conversion",
    "export": "deploy",
    "transform": "conversion",
    "load": "serialization",
    "save": "serialization",
    "trace": "tracing",
    "RoutedStage": "nn.routed_stage",
    "RoutingConfig": "nn.rules",
    "rule_names": "nn.rules",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rmn_fx' has no attribute {name!r}")


__all__ = [
    "Anatomy",
    "ConversionError",
    "ExportError",
    "InputSizeError",
    "ModelBuildError",
    "ModelFileError",
    "ModelNotFoundError",
    "ModelTaskError",
    "NoDownsamplingError",
    "OptionError",
    "OutputPathError",
    "RMNError",
    "RoutedStage",
    "RoutingConfig",
    "StageError",
    "TraceError",
    "TrainingFailed",
    "TrainingInterrupted",
    "UntrustedCodeError",
    "WeightsError",
    "analyze",
    "export",
    "load",
    "rule_names",
    "save",
    "trace",
    "transform",
]
