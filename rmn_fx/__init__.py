"""rmn-fx: compile torchvision/timm backbones into Neural Routing by Memory (RMN) networks."""

from .errors import (
    ConversionError,
    InputSizeError,
    ModelFileError,
    ModelNotFoundError,
    NoDownsamplingError,
    OptionError,
    OutputPathError,
    RMNError,
    StageError,
    TraceError,
    WeightsError,
)
from .routed_stage import RoutedStage
from .serialization import load, save
from .tracing import trace
from .transform import Anatomy, analyze, transform

__version__ = "0.1.0"
__all__ = [
    "Anatomy",
    "ConversionError",
    "InputSizeError",
    "ModelFileError",
    "ModelNotFoundError",
    "NoDownsamplingError",
    "OptionError",
    "OutputPathError",
    "RMNError",
    "RoutedStage",
    "StageError",
    "TraceError",
    "WeightsError",
    "analyze",
    "load",
    "save",
    "trace",
    "transform",
]
