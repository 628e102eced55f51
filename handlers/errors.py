"""Every failure the serving path can answer with, and the one mapping from a failure to HTTP.

Failures are typed where they happen: a client mistake is a ``RequestError`` (raised by the
codecs and validation), a stage that failed on an executor is an ``ExecutorFailed`` (its
``ExecutorOutOfMemory`` subclass when the device ran out of memory), a stage or request past
its deadline is a ``StageTimeout``. Out-of-memory is recognised once, at the executor boundary
(``executor_failure``), from the exception's type or its CUDA / ONNX Runtime / arena message;
nothing downstream reads message text, so rewording a message cannot change a status.
"""

from __future__ import annotations

ECHO_CHARS = 80  # the most of any client-supplied text a message repeats
MESSAGE_CHARS = 400  # hard cap on a whole message, whatever was formatted into it

INTERNAL_ERROR = 500
SERVICE_UNAVAILABLE = 503
GATEWAY_TIMEOUT = 504
INSUFFICIENT_STORAGE = 507  # what TorchServe itself answers for MemoryError and CUDA errors

# Lower-cased fragments that mean "the allocation failed" in the errors executors see.
_OOM_MARKERS = (
    "out of memory",
    "failed to allocate memory",  # ORT's BFC arena
    "cudaerrormemoryallocation",
    "alloc_failed",  # CUBLAS_STATUS_ALLOC_FAILED, CUDNN_STATUS_ALLOC_FAILED
    "smaller than requested bytes",  # ORT's BFC arena at gpu_mem_limit (seen on an H100)
)


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RequestError(Exception):
    """A client mistake: ``status`` is the HTTP code, ``message`` is safe to return verbatim.

    ``request_format`` is filled in by the decoder once it knows the body's format, so the
    error can be answered in that format (KServe v2 clients expect ``{"error": ...}``).
    """

    def __init__(self, status: int, message: str, request_format: str | None = None) -> None:
        message = clip(str(message), MESSAGE_CHARS)
        super().__init__(status, message, request_format)
        self.status = status
        self.message = message
        self.request_format = request_format

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"


class ExecutorFailed(RuntimeError):
    """A stage failed on an executor; the message says which, never the raw input."""


class ExecutorOutOfMemory(ExecutorFailed):
    """The executor's device ran out of memory: a sign of load, retried on a CPU group."""


class StageTimeout(RuntimeError):
    """A micro-batch did not finish within the per-stage deadline or the request's budget."""


class ExecutorLoadError(RuntimeError):
    """An executor could not load its stages (RuntimeError so TorchServe reports a load failure)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Does this raw exception (torch, CUDA, ONNX Runtime) mean an allocation failed?"""
    if isinstance(exc, ExecutorOutOfMemory):
        return True
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _OOM_MARKERS)


def executor_failure(exc: BaseException, stage: str, executor: str) -> ExecutorFailed:
    """The typed failure for whatever a stage run raised: the executor boundary's one classifier."""
    if isinstance(exc, ExecutorFailed):  # already says what went wrong
        return exc
    if is_out_of_memory(exc):
        return ExecutorOutOfMemory(f"stage {stage!r} on {executor}: out of memory")
    return ExecutorFailed(f"stage {stage!r} failed on {executor}")


def http_error(exc: BaseException) -> RequestError:
    """The one mapping from any failure to the status and message a client gets."""
    if isinstance(exc, RequestError):
        return exc
    text = str(exc)
    if isinstance(exc, ExecutorOutOfMemory):
        return RequestError(
            INSUFFICIENT_STORAGE, f"out of GPU memory and no CPU fallback succeeded: {text}"
        )
    if isinstance(exc, StageTimeout):
        return RequestError(GATEWAY_TIMEOUT, f"inference timed out: {text}")
    if isinstance(exc, ExecutorFailed):
        return RequestError(SERVICE_UNAVAILABLE, f"inference failed: {text}")
    return RequestError(INTERNAL_ERROR, "internal error in the hetserve runtime")
