"""Errors a user can cause. Each message says what to change."""


class AttnoptError(Exception):
    """Base class of every error attnopt raises on purpose."""


class CaptureError(AttnoptError):
    """The model could not be captured into a graph by any front end."""


class UnsupportedModelError(AttnoptError):
    """What was passed as the model is not something attnopt can read."""


class InputSignatureError(AttnoptError):
    """The example inputs do not match the model's forward signature."""


class UnsupportedOutputError(AttnoptError):
    """The model returns something the optimized module cannot reproduce."""


class ShapeError(AttnoptError):
    """An input shape the optimized module was not captured for."""


class UnsupportedTargetError(AttnoptError):
    """The requested hardware target is unknown or unavailable."""


class KernelError(AttnoptError):
    """A kernel was called with inputs outside its contract."""


class TuningStorageError(AttnoptError):
    """The tuning database cannot be opened or written."""


class OnnxModelError(AttnoptError):
    """An ONNX file is missing, corrupt, or uses an unsupported opset or op."""
