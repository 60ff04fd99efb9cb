"""Typed errors the engine raises for bad input, so callers (the HTTP API) can answer 4xx, not 500."""


class EngineError(Exception):
    """Base class for every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request the engine cannot serve as asked: bad prompt, sampling parameters or lengths."""


class IncompatibleDraftError(EngineError, ValueError):
    """A draft (model or weights) that cannot propose for this target, e.g. a different vocabulary."""


class ModelLoadError(EngineError, OSError):
    """A model directory or hub id that could not be loaded."""


class RequestTimeoutError(EngineError):
    """A request ran past its deadline (the replica's `request_timeout`); its slot was freed."""


class StepFailedError(EngineError):
    """A decode step failed on the server's side; the requests in it failed, the replica goes on."""
