"""Exceptions rmn-fx raises for bad input.

Every message is one line that names the problem and the fix; the CLI prints it as is
(exit code 2, no traceback). Catch `RMNError` to catch them all.
"""


class RMNError(Exception):
    """Base class of every error rmn-fx raises on purpose."""


class OptionError(RMNError, ValueError):
    """A conversion option is out of range (branches < 1, unknown stage index, ...)."""


class ModelNotFoundError(RMNError, LookupError):
    """A model name resolves to neither torchvision, timm, nor an importable factory."""


class ModelBuildError(RMNError):
    """A model factory raised while building the network."""


class UntrustedCodeError(RMNError):
    """A model file names a `package.module:factory` to import; loading it needs an opt-in."""


class WeightsError(RMNError):
    """A --weights file is missing, unreadable, or does not fit the model."""


class ModelTaskError(RMNError):
    """The model, as a whole, is not a network of one input batch (a detector takes a list of
    images, an optical-flow model two); the message says which part to convert, if any."""


class TraceError(RMNError):
    """torch.fx cannot capture the model; the message names the module and the reason."""


class InputSizeError(RMNError):
    """The model rejects the sample input used for shape propagation."""


class StageError(RMNError):
    """Stages cannot be found, or the stages a user named do not describe the network."""


class NoDownsamplingError(StageError):
    """The network has no resolution drop after its stem, so stages must be named by hand."""


class ConversionError(RMNError):
    """The converted model does not compute the original function (a bug: please report)."""


class ExportError(RMNError):
    """A model cannot be exported in the format asked for (the message names the failing op)."""


class ModelFileError(RMNError):
    """A model file is missing, corrupt, truncated, of another format version, or not ours."""


class ModulesLeftOutWarning(UserWarning):
    """The converted model leaves out modules its base has but never calls at inference
    (auxiliary classifiers); the message names them."""


class OutputPathError(RMNError):
    """An output path cannot be written (missing or read-only directory)."""


class TrainingInterrupted(RMNError):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint (not a failure:
    resume it). `exit_code` is the shell's for that signal (130, 143)."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrainingFailed(RMNError):
    """Training finished but the model did not learn (test accuracy at chance)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type): the reason part of ours."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
