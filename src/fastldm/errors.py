"""One hierarchy for everything a user can fix: a checkpoint, a request, a setting, a machine limit.

Every class here means "the user can do something about it"; the message says what is wrong and what to
do, in one line, and names no command-line flag (the CLI and the server add their own hints). The CLI maps
each class to a one-line message and its `exit_code`; the HTTP server maps it to a 4xx status and a JSON
reason. Anything else that escapes the library (a torch failure, a bug) is *not* one of these and keeps its
traceback.

Classes also derive from the builtin they refine (ValueError, RuntimeError, ...), so code written against
the builtins keeps working. They pickle with their fields (Exception's pickling calls cls(*args), so a class
whose constructor takes its fields says how to rebuild it, in __reduce__) (a Ray Serve model worker's error reaches the HTTP
process that answers the client).
"""
from __future__ import annotations


class FastLDMError(Exception):
    """Base of every user-fixable fastldm error."""
    exit_code = 1
    http_status = 400


class CheckpointError(FastLDMError, ValueError):
    """A checkpoint that cannot be loaded: missing, truncated, of an unknown or unsupported layout."""
    exit_code = 3
    http_status = 404


class UnknownCheckpointError(CheckpointError):
    """A checkpoint whose keys or shapes match no model family fastldm knows; the message says what was found."""


class SettingError(FastLDMError, ValueError):
    """A load or runtime setting that is not valid (dtype, quantization, prediction type, device)."""
    exit_code = 2


class RequestError(FastLDMError, ValueError):
    """A generation request with a bad field. `field` names it (as in GenerationRequest), `value` is what was
    given and `allowed` says what would be accepted."""
    exit_code = 4
    http_status = 422

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} is not valid: {allowed}")

    def __reduce__(self):
        return type(self), (self.field, self.value, self.allowed)


class BackendUnavailable(FastLDMError, RuntimeError):
    """A kernel backend, runtime mode or device was asked for but cannot run here (or for this input)."""
    exit_code = 5
    http_status = 400


class StepPredictorMissing(FastLDMError, FileNotFoundError):
    """`steps="auto"` was asked for a model and sampler with no trained step predictor."""
    exit_code = 6
    http_status = 422


class MemoryBudgetError(FastLDMError, MemoryError):
    """A plan that cannot fit its memory budget (refused before it starts, with what it would need), or a run
    that ran out of memory (that request ends; the process stays up)."""
    exit_code = 7
    http_status = 507

    def __init__(self, message: str, needed: int | None = None, budget: int | None = None):
        self.needed, self.budget = needed, budget
        super().__init__(message)

    def __reduce__(self):
        return type(self), (str(self), self.needed, self.budget)


class Cancelled(FastLDMError):
    """A run that its caller cancelled (interrupt, a disconnected client, a server shutting down)."""
    exit_code = 130
    http_status = 499


class ShuttingDown(Cancelled):
    """A request the server could not finish because it is shutting down (Ctrl-C)."""
    http_status = 503


class WorkerLost(FastLDMError, ConnectionError):
    """A job whose model worker stopped before answering (a Ray Serve replica that died or was removed: Ray
    starts a replacement, so the same request can be sent again)."""
    http_status = 503


class UnknownModel(FastLDMError, LookupError):
    """A model name that is not in the server's listing (names are looked up, never opened as paths)."""
    exit_code = 3
    http_status = 404

    def __init__(self, name: str, listed: list[str]):
        self.name, self.listed = name, listed
        super().__init__(f"no model called {name!r}; the models are: {', '.join(listed)}")

    def __reduce__(self):
        return type(self), (self.name, self.listed)


class UnknownJob(FastLDMError, LookupError):
    """A job id the server does not know, or whose result it no longer keeps."""
    http_status = 404

    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"no job {job_id!r}: unknown, or finished too long ago to be kept")

    def __reduce__(self):
        return type(self), (self.job_id,)


class QueueFull(FastLDMError):
    """The server has as many requests waiting as it accepts; `retry_after` is its estimate (seconds) of when
    there is room again."""
    http_status = 429

    def __init__(self, waiting: int, retry_after: int):
        self.waiting, self.retry_after = waiting, retry_after
        super().__init__(f"the server is busy: {waiting} requests are waiting; try again in about {retry_after} s")

    def __reduce__(self):
        return type(self), (self.waiting, self.retry_after)


class Unauthorized(FastLDMError, PermissionError):
    """A request to a server that wants an API key, without the right one."""
    http_status = 401
