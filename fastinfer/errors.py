"""Error classes raised by fastinfer. Bad requests raise ``ValueError`` subclasses so that
callers that only know Python's built-ins still catch them."""


class FastInferError(Exception):
    """Base class of every fastinfer-specific error."""


class ModelLoadError(FastInferError):
    """A model could not be found or read (unknown path, corrupt or unsupported file)."""


class InvalidRequestError(FastInferError, ValueError):
    """A request was rejected at submission; the engine state is unchanged."""


class RequestTooLargeError(InvalidRequestError):
    """A request can never fit: longer than ``max_model_len`` or than the whole KV cache."""


class NativeExtensionError(FastInferError, ImportError):
    """The compiled extension ``fastinfer._C`` is missing: the package was not built."""
