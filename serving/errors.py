"""Typed errors the engines and the replica raise on purpose, so callers (the HTTP API) answer 4xx or
503, not 500."""


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


class ServerBusyError(EngineError):
    """The replica cannot take the request now: its queue is full, or it is stopping (HTTP 503)."""
