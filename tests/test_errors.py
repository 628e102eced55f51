"""The typed failures and the one mapping from a failure to an HTTP status."""

from __future__ import annotations

import pytest

from handlers.errors import (
    ExecutorFailed,
    ExecutorOutOfMemory,
    RequestError,
    StageTimeout,
    executor_failure,
    http_error,
)


@pytest.mark.parametrize(
    "raw",
    [
        RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 2: out of memory"),
        RuntimeError("Failed to allocate memory for requested buffer of size 1048576"),
        RuntimeError("CUBLAS_STATUS_ALLOC_FAILED"),
    ],
)
def test_allocation_failures_are_classified_once_at_the_executor_boundary(raw):
    failure = executor_failure(raw, "tail", "cpu1")
    assert isinstance(failure, ExecutorOutOfMemory)
    assert str(failure) == "stage 'tail' on cpu1: out of memory"  # no raw text reaches a client
    assert http_error(failure).status == 507


def test_other_failures_keep_their_type_and_hide_the_raw_message():
    failure = executor_failure(ValueError("input x: bad shape /secret/path"), "head", "cpu0")
    assert type(failure) is ExecutorFailed and "secret" not in str(failure)
    typed = ExecutorOutOfMemory("stage 'head' on cuda0s0: CUDA out of memory")
    assert executor_failure(typed, "head", "cuda0s0") is typed


def test_the_status_follows_the_type_not_the_wording():
    # A message that merely mentions memory is not an out-of-memory failure any more.
    assert http_error(ExecutorFailed("stage 'tail' failed: out of memory in the text")).status == 503
    assert http_error(ExecutorOutOfMemory("reworded")).status == 507
    assert http_error(StageTimeout("late")).status == 504
    assert http_error(KeyError("bug")).message == "internal error in the hetserve runtime"
    client = RequestError(400, "input 'x': wrong shape")
    assert http_error(client) is client
