"""TorchServe entry point (``--handler``): a thin adapter over ``handlers.service``.

It reads the verified manifest and builds the runtime in ``initialize``, then, per batch,
translates TorchServe's request list and context into plain requests and back. TorchServe
requires exactly one class in this module.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from handlers.connection_guard import ConnectionGuard, hold_seconds
from handlers.frontend_limits import read_frontend_max_response_size
from handlers.observability.metrics import emit_runtime_metrics
from handlers.observability.tracing import HOST, Span
from handlers.protocol.kserve_v2 import ENVELOPE_STATUS, envelope_error
from handlers.service import InferenceService, RawRequest, Reply

log = logging.getLogger(__name__)

# What a request gets when the service itself fails: a clear JSON 500, no internals.
_INTERNAL_ERROR = Reply(
    500,
    {"code": 500, "type": "InternalServerError", "message": "internal error in hetserve"},
    "application/json",
    reason="internal error in hetserve",
)


class HetServeHandler:
    def __init__(self) -> None:
        self.service: InferenceService | None = None
        self.initialized = False
        self.guard: ConnectionGuard | None = None

    def initialize(self, context: Any) -> None:
        # Bodies must reach the handler as bytes: it bounds JSON size and depth itself.
        os.environ["TS_DECODE_INPUT_REQUEST"] = "false"
        model_dir = context.system_properties.get("model_dir")
        version = ((context.manifest or {}).get("model") or {}).get("modelVersion", "1.0")
        try:
            self.service = InferenceService.load(
                model_dir, context.model_yaml_config, version, served_name=context.model_name,
                # TorchServe does not pass its max_response_size: read its config file instead.
                frontend_limit=read_frontend_max_response_size(),
            )
        except Exception as exc:  # noqa: BLE001 - re-raised as the one type TorchServe reports
            # TorchServe only reports RuntimeError/MemoryError as a load failure; anything else
            # (ONNX Runtime's errors included) would kill the worker without a clear reason.
            # One line, so an operator grepping the model log sees file and reason together.
            reason = " ".join(str(exc).split()) or type(exc).__name__
            log.error("hetserve: model %s failed to load: %s", context.model_name, reason)
            raise RuntimeError(
                f"hetserve could not load model {context.model_name}: {reason}"
            ) from None
        # TorchServe drops requests it is gathering when our connection closes: see the module.
        self.guard = ConnectionGuard.start(hold_seconds(context.model_yaml_config))
        self.initialized = True

    def close(self) -> None:
        """Unload in process (tests, embedding): the runtime's threads and the guard process go.
        A TorchServe worker never calls this; its process exit does the same."""
        if self.guard is not None:
            self.guard.stop()
            self.guard = None
        if self.service is not None:
            self.service.close()
            self.service = None
        self.initialized = False

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        started = time.perf_counter()
        answers = self._handle(data, context)
        timeline = self.service.timeline if self.service is not None else None
        if timeline is not None:  # benchmarks: the adapter's own cost around the service's handle
            timeline.record(Span("adapter", HOST, "adapter", started, time.perf_counter(), len(data or [])))
        return answers

    def _handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        request_ids = getattr(context, "request_ids", None)
        refused = envelope_error(data, len(request_ids) if request_ids else None)
        if refused is not None:
            # A service_envelope rewrote the batch: answering it would lose or corrupt requests.
            # Raised, so TorchServe answers every request of the batch with this message.
            log.error("hetserve: model %s: %s", context.model_name, refused)
            raise _prediction_error(refused, ENVELOPE_STATUS)
        try:
            requests = [_raw_request(item, context, i) for i, item in enumerate(data or [])]
            replies = self._service().handle(requests)
        except Exception:  # noqa: BLE001 - a bug must answer each request, not kill the batch
            log.exception("hetserve: unexpected failure handling a batch of %d", len(data or []))
            replies = [_INTERNAL_ERROR] * len(data or [])
        for i, reply in enumerate(replies):
            context.set_response_status(reply.status, reply.reason, i)
            context.set_response_content_type(i, reply.content_type)
            for key, value in reply.headers.items():
                context.set_response_header(i, key, value)
        try:
            emit_runtime_metrics(context.metrics, context.model_name, self._service().drain_stats())
        except Exception:  # noqa: BLE001 - metrics must never cost a client its answer
            log.exception("hetserve: could not emit runtime metrics")
        return [_wire(reply.body) for reply in replies]

    def _service(self) -> InferenceService:
        if self.service is None:
            raise RuntimeError("hetserve handler used before initialize")
        return self.service


def _prediction_error(message: str, status: int) -> Exception:
    """TorchServe's PredictionException (its message and code reach every client of the batch)."""
    try:
        from ts.utils.util import PredictionException
    except ImportError:  # outside a TorchServe worker
        return RuntimeError(message)
    error: Exception = PredictionException(message, status)  # ts is untyped
    return error


def _raw_request(item: dict[str, Any], context: Any, index: int) -> RawRequest:
    headers = {
        k.lower(): v for k, v in context.get_all_request_header(index).items() if isinstance(v, str)
    }
    name: str | None = next(iter(item), None)  # else the first part, whatever its name
    if "body" in item or "data" in item:
        name = "body" if "body" in item else "data"
    part = context.get_all_request_header(index).get(name) if name else None
    content_type = (
        part.get("content-type") if isinstance(part, dict) else headers.get("content-type")
    )
    # TorchServe passes each query parameter (?raw=1) as its own entry next to the body.
    params = {k: v for k, v in item.items() if k != name and isinstance(k, str)}
    return RawRequest(
        body=item.get(name) if name else None, content_type=content_type, headers=headers,
        params=params,
    )


def _wire(body: Any) -> Any:
    # TorchServe would pretty-print dicts with indent=2: serialise compactly ourselves.
    if isinstance(body, dict | list):
        return json.dumps(body, separators=(",", ":"))
    return body
