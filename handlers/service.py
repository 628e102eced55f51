"""The serving logic behind the handler, free of TorchServe types so tests can drive it directly.

``InferenceService.load`` reads and verifies the manifest, probes the cores, builds executors and
calibrates them; ``handle`` turns a batch of raw requests into one response per request, each
with its own status: one bad request never fails its neighbours.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handlers.artifact.archive_digest import check_archive_digest
from handlers.artifact.history_key import history_key
from handlers.artifact.manifest import MANIFEST_NAME, Manifest, TensorSpec, load_verified_manifest
from handlers.batching import Group, ShapeGroups, early_rows, is_text, rows
from handlers.decode_pool import DecodePool, decode_threads
from handlers.errors import RequestError, http_error
from handlers.frontend_limits import FrontendLimit
from handlers.hardware.topology import probe
from handlers.observability.tracing import HOST, Recorder, Span, span_file_from_env
from handlers.processors import Processors
from handlers.processors.codecs import processor_codecs
from handlers.protocol.codecs import (
    CODECS,
    DecodedRequest,
    EncodedResponse,
    RequestDecoder,
    encode_error,
    encode_response,
)
from handlers.protocol.dynamic_dims import DynamicDims
from handlers.protocol.response_size import AnswerSizes, ResponseLimit, body_size
from handlers.runtime.assembly import build_runtime
from handlers.runtime.config import RuntimeConfig
from handlers.runtime.flow import MicroBatchOutcome, PendingRun, Runtime, RuntimeStats
from handlers.runtime.perf_model import PerfHistory

log = logging.getLogger(__name__)

# How many requests shared this one's run: lets clients see batching at work.
BATCH_HEADER = "X-Hetserve-Batch"
# Text requests: the token length their run was padded to (similar lengths share a run).
TOKENS_HEADER = "X-Hetserve-Padded-Tokens"


@dataclass(frozen=True)
class RawRequest:
    body: Any
    content_type: str | None
    headers: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)  # query parameters (?raw=1)


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    content_type: str
    headers: Mapping[str, str] = field(default_factory=dict)
    reason: str = ""


class InferenceService:
    def __init__(
        self,
        manifest: Manifest,
        runtime: Runtime,
        config: RuntimeConfig,
        state_path: Path | None,
        model_version: str = "1.0",
        processors: Processors | None = None,
        served_name: str | None = None,
        response_limit: ResponseLimit | None = None,
        decoder: DecodePool | None = None,
    ) -> None:
        self.manifest = manifest
        # KServe v2 answers carry the name the model is served under, which an operator may have
        # registered differently from the archive's --model-name.
        self.served_name = served_name or manifest.model_name
        self.processors = processors
        self.decoder = decoder or DecodePool(0)
        # The one request decoder: the processors' codecs (if any) in front of the tensor codecs.
        codecs = processor_codecs(processors) if processors is not None else CODECS
        dims = DynamicDims.from_json(manifest.dynamic_dims)
        self.requests = RequestDecoder(manifest.inputs, config.limits, manifest.outputs, codecs, dims)
        self.runtime = runtime
        self.config = config
        self.response_limit = response_limit or ResponseLimit(config.limits.max_response_bytes)
        self._sizes = AnswerSizes(manifest.outputs, self.response_limit)  # fixed at load
        self.state_path = state_path
        self.model_version = model_version
        if state_path is not None:  # periodic saves run on the supervisor, off the request path
            runtime.supervisor.save_every(self.save_history, config.save_interval_s)
        # When set, each batch's host phases (decode, assemble, run, encode) are recorded on
        # lane "handler", and the whole batch as "handle" on lane "worker": what the request
        # path costs around the executors' work.
        self.timeline: Recorder | None = None

    def trace_into(self, recorder: Recorder | None) -> None:
        """Record this service's and its executors' spans into ``recorder`` (None: stop)."""
        self.timeline = recorder
        for executor in self.runtime.executors.values():
            executor.timeline = recorder

    def _trace(self, phase: str, start: float, batch: int) -> float:
        now = time.perf_counter()
        if self.timeline is not None:
            self.timeline.record(Span("handler", HOST, phase, start, now, batch))
        return now

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        model_yaml: Mapping[str, Any] | None = None,
        model_version: str = "1.0",
        served_name: str | None = None,
        frontend_limit: FrontendLimit | None = None,
    ) -> InferenceService:
        """``frontend_limit``: TorchServe's max_response_size, when the adapter could read it."""
        model_dir = Path(model_dir)
        check_archive_digest(model_dir)  # the operator's pin, before anything else is read
        config = RuntimeConfig.from_model_yaml(model_yaml)
        manifest = load_verified_manifest(model_dir)
        state_path = _state_path(model_dir, manifest, config)
        history = PerfHistory.load(state_path, alpha=config.ewma_alpha)
        topology = probe()  # once per load: the runtime's core groups and the decode pool
        runtime = build_runtime(manifest, model_dir, config, history, topology)
        processors = Processors.load(config.processors, model_dir, manifest)
        archive_sets = "max_response_bytes" in (((model_yaml or {}).get("hetserve") or {}).get("limits") or {})
        response_limit = ResponseLimit(config.limits.max_response_bytes, archive_sets, frontend_limit)
        log.info("hetserve: %s", response_limit.log_line())
        decoder = DecodePool(decode_threads(len(topology.cores), processors is not None))
        service = cls(
            manifest, runtime, config, state_path, model_version, processors, served_name,
            response_limit, decoder,
        )
        service.save_history()
        service.trace_into(span_file_from_env())  # HETSERVE_TRACE_DIR: benchmarks only
        return service

    # -- the request path --
    def handle(self, requests: Sequence[RawRequest]) -> list[Reply]:
        started = time.perf_counter()
        try:
            return self._handle(requests, started)
        finally:
            if self.timeline is not None:
                self.timeline.record(
                    Span("worker", HOST, "handle", started, time.perf_counter(), len(requests))
                )
                self.timeline.flush()  # a SpanFile: another process reads it during the run

    def _handle(self, requests: Sequence[RawRequest], started: float) -> list[Reply]:
        """Decode on the pool; a shape group starts running as soon as it holds a micro-batch's
        rows while other requests still decode (``handlers.batching``)."""
        replies: list[Reply | None] = [None] * len(requests)
        first = self.runtime.micro_batches(len(requests))[0][1] if requests else 0
        groups = ShapeGroups(early_rows(first, len(requests), self.decoder.threads))
        decoding = self.decoder.start(requests, functools.partial(_decode_or_error, self.requests), _body_size)
        running: list[tuple[Group, PendingRun | BaseException]] = []
        for index, outcome in decoding:
            if isinstance(outcome, RequestError):
                replies[index] = _error_reply(outcome, None)
            elif (refused := self._sizes.refusal(outcome)) is not None:  # its answer cannot fit
                replies[index] = _error_reply(refused, outcome.format)
            else:
                ready = groups.add(index, outcome, still_decoding=decoding.pending > 0)
                if ready is not None:
                    running.append(self._start_group(*ready))
        self._trace("decode", started, len(requests))
        pad = self.processors.pad_texts if self.processors is not None else None
        running += [self._start_group(group, size) for group, size in groups.rest(pad)]
        for group, pending in running:
            self._answer_group(group, pending, replies)
        return [r if r is not None else _internal_error() for r in replies]

    def _start_group(self, group: Group, micro_batch: int) -> tuple[Group, PendingRun | BaseException]:
        started = time.perf_counter()
        try:
            feeds = assemble_feeds(group, self.manifest.inputs)
            self._trace("assemble", started, rows(group))
            return group, self.runtime.submit(feeds, micro_batch)
        except Exception as exc:  # noqa: BLE001 - a runtime bug must still answer every request
            log.exception("runtime failure for %d request(s)", len(group))
            return group, exc

    def _answer_group(
        self, group: Group, pending: PendingRun | BaseException, replies: list[Reply | None]
    ) -> None:
        started = time.perf_counter()
        samples = rows(group)
        if isinstance(pending, BaseException):  # it could not start; logged then
            outcomes = [MicroBatchOutcome(0, samples, None, pending)]
        else:
            try:
                outcomes = pending.outcomes()
            except Exception as exc:  # noqa: BLE001 - a runtime bug must still answer every request
                log.exception("runtime failure for %d request(s)", len(group))
                outcomes = [MicroBatchOutcome(0, samples, None, exc)]
        started = self._trace("run", started, samples)
        offset = 0
        for index, request in group:
            mine = _slice_outcomes(outcomes, offset, offset + request.batch)
            offset += request.batch
            replies[index] = self._answer(index, mine, request, len(group))
        self._trace("encode", started, samples)

    def _answer(
        self, index: int, mine: dict[str, np.ndarray] | BaseException, request: DecodedRequest, shared: int
    ) -> Reply:
        """One request's reply: its rows encoded in its format, or its own error."""
        if isinstance(mine, BaseException):
            return _error_reply(http_error(mine), request.format)
        try:
            encoded = self._encode(mine, request)
        except RequestError as err:  # e.g. the answer would exceed a response limit
            return _error_reply(err, request.format)
        except Exception:  # noqa: BLE001 - an encoder bug fails this request, not the batch
            log.exception("response %d could not be encoded", index)
            return _error_reply(RequestError(500, "internal error encoding the response"), request.format)
        size = body_size(encoded.body)
        if size > self.response_limit.bytes:  # TorchServe would kill the worker: a 413 instead
            return _error_reply(self._sizes.too_large(size, mine, request), request.format)
        return _reply(200, encoded, extra=_batch_headers(shared, request))

    def _encode(self, outputs: Mapping[str, np.ndarray], request: DecodedRequest) -> EncodedResponse:
        """The labels answer when the processors give one, else the request's codec's."""
        labels = self.processors.encode(outputs, request) if self.processors else None
        return labels or encode_response(
            outputs, request, self.manifest.outputs,
            model_name=self.served_name, model_version=self.model_version,
        )

    # -- performance history persistence --
    def save_history(self) -> None:
        if self.state_path is None:
            return
        try:
            self.runtime.history.save(self.state_path)  # PerfHistory locks itself
        except OSError as exc:
            log.warning("could not save the performance history to %s: %s", self.state_path, exc)

    def drain_stats(self) -> RuntimeStats:
        return self.runtime.drain_stats()

    def close(self) -> None:
        self.save_history()
        self.decoder.close()
        self.runtime.close()


def _state_path(model_dir: Path, manifest: Manifest, config: RuntimeConfig) -> Path:
    """Where this archive's performance history lives: keyed by its manifest's digest and by
    the stages and core groups it serves."""
    digest = hashlib.sha256((model_dir / MANIFEST_NAME).read_bytes()).hexdigest()
    key = history_key(manifest, config.ratio, config.core_groups, config.cpu_head_groups, config.precision)
    return config.state_path(manifest.model_name, digest, model_dir, key)


def assemble_feeds(
    group: Sequence[tuple[int, DecodedRequest]], specs: Sequence[TensorSpec]
) -> dict[str, np.ndarray]:
    """One batch's feeds: a lone request's arrays as they are (views of its body, no copy);
    several requests' rows written once, straight into one buffer per input that the executors
    read (their micro-batches are row slices of it, never copied again)."""
    if len(group) == 1:
        arrays = group[0][1].arrays
        return {spec.name: arrays[spec.name] for spec in specs}
    feeds = {}
    for spec in specs:
        parts = [request.arrays[spec.name] for _, request in group]
        buffer = np.empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), parts[0].dtype)
        row = 0
        for part in parts:
            buffer[row : row + part.shape[0]] = part
            row += part.shape[0]
        feeds[spec.name] = buffer
    return feeds


def _slice_outcomes(
    outcomes: Sequence[MicroBatchOutcome], start: int, stop: int
) -> dict[str, np.ndarray] | BaseException:
    """One request's rows out of the micro-batches, or the error of the first one that failed."""
    pieces: dict[str, list[np.ndarray]] = {}
    for outcome in outcomes:
        lo, hi = max(start, outcome.start), min(stop, outcome.stop)
        if lo >= hi:
            continue
        if outcome.error is not None:
            return outcome.error
        for name, value in (outcome.outputs or {}).items():
            pieces.setdefault(name, []).append(value[lo - outcome.start : hi - outcome.start])
    return {n: p[0] if len(p) == 1 else np.concatenate(p) for n, p in pieces.items()}


def _decode_or_error(decoder: RequestDecoder, request: RawRequest) -> DecodedRequest | RequestError:
    """Runs on the decode pool: a bad body becomes its own error, never its neighbours'."""
    try:
        return decoder.decode(request.body, request.content_type, request.headers, request.params)
    except RequestError as err:
        return err
    except Exception:  # noqa: BLE001 - a decoder bug fails this request, not the batch
        log.exception("a request could not be decoded")
        return RequestError(500, "internal error decoding the request")


def _body_size(request: RawRequest) -> int:
    body = request.body
    return len(body) if isinstance(body, bytes | bytearray | memoryview | str) else 0


def _batch_headers(shared: int, request: DecodedRequest) -> dict[str, str]:
    headers = {BATCH_HEADER: str(shared)}
    if is_text(request):  # the length its run was padded to (length-aware batching)
        headers[TOKENS_HEADER] = str(next(iter(request.arrays.values())).shape[1])
    return headers


def _reply(status: int, encoded: EncodedResponse, reason: str = "", extra: Mapping[str, str] | None = None) -> Reply:
    return Reply(status, encoded.body, encoded.content_type, {**encoded.headers, **(extra or {})}, reason)


def _error_reply(err: RequestError, request_format: str | None) -> Reply:
    return _reply(err.status, encode_error(err, request_format), reason=err.message[:120])


def _internal_error() -> Reply:
    return _error_reply(RequestError(500, "no response was produced for this request"), None)

