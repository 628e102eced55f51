"""``hetserve archive --quantize int8``: int8 stages for the CPU executors, next to the float ones.

For the whole model and each partition's head and tail, ONNX Runtime's quantizer writes an int8
copy (``model-int8.onnx``, ``stage-r0.800-head-int8.onnx`` ...; their weights in one
``weights-int8.bin``, stored once however many stages share them, and the tensors they leave
float pointing into the float stages' ``weights.bin``). Quantization happens inside
each stage: its inputs and outputs stay float32 (the QuantizeLinear/DequantizeLinear pairs sit
inside), so cut tensors are float32 and head and tail can run at different precisions; a GPU
executor keeps loading the float files (handlers/runtime/assembly.py ``cpu_stage_files``).

Method, chosen per model from measurements (``partitioner.quant_metrics.choose_method``):

* ``static``: QDQ, per-channel int8 weights, uint8 activations with ranges calibrated (MinMax)
  on the calibration inputs; what convolutional and other activation-heavy graphs want.
* ``dynamic``: the MatMul/Gemm weights int8 per channel, activations quantized per run; the
  usual choice for transformer MatMuls, where static activation ranges lose accuracy.
* ``dynamic_u8``: the same with uint8 weights. x86 CPUs without VNNI (AVX2 only) multiply
  uint8 x int8 pairs into int16 sums that can saturate; uint8 x uint8 takes another kernel. On
  this project's AVX2 machine it kept the trained MiniLM's sentence embeddings at cosine 0.99
  where int8 weights gave 0.98.

All are tried on the whole model; the fastest (in process, against float32) that meets the
accuracy threshold on held-out inputs is kept for every stage. The accuracy of the int8 whole
model and of each int8 head -> int8 tail pair is measured against the float model on the
held-out inputs and recorded in the manifest; below the threshold the archive is refused
(``AccuracyError``, one line) unless the loss is allowed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from handlers.artifact.manifest import (
    INT8,
    FileEntry,
    Manifest,
    Partition,
    StageVariant,
    sha256_file,
    write_manifest,
)
from partitioner.calibration import CalibrationError, CalibrationSet, Feeds, read_directory
from partitioner.quant_metrics import (
    DEFAULT_MIN_ACCURACY,
    Accuracy,
    Candidate,
    choose_method,
    held_out_indices,
    is_classifier,
    judge,
    measure,
)
from partitioner.stages import (  # the float stages' weight-file format, shared
    INLINE_LIMIT,
    PAGE,
    SharedWeights,
    _clear_data,
    _point_at,
    run_pipeline,
    save_model,
)

STATIC, DYNAMIC, DYNAMIC_U8 = "static", "dynamic", "dynamic_u8"
METHODS = (STATIC, DYNAMIC, DYNAMIC_U8)
INT8_WEIGHTS_FILE = "weights-int8.bin"
RANDOM_INPUTS = 16  # without --calibration: enough for a smoke test, no more
TIMING_BATCH = 4
TIMING_ROUNDS = 5
TIMING_ROUND_S = 0.1
RANDOM_WARNING = (
    "warning: no --calibration DIR: int8 is calibrated and checked on random inputs. That is a "
    "smoke test, not a calibration: the recorded accuracy says nothing about real data. Pass "
    "--calibration with a few hundred real inputs (images, .txt, .npy/.npz)"
)


class QuantizeError(ValueError):
    """A stage could not be quantized as promised (its boundary dtypes would change)."""


class AccuracyError(ValueError):
    """The int8 stages miss the accuracy threshold; the message is one line."""


@dataclass(frozen=True)
class QuantizeOptions:
    calibration: Path | None = None
    min_accuracy: float = DEFAULT_MIN_ACCURACY
    allow_accuracy_loss: bool = False
    method: str = "auto"  # auto (measure every method) or one of METHODS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("auto", *METHODS):
            raise ValueError(f"quantization method must be auto or one of {METHODS}, got {self.method!r}")
        if not self.min_accuracy > 0.0:
            raise ValueError(f"--min-accuracy must be > 0, got {self.min_accuracy:g}")


@dataclass(frozen=True)
class QuantizeResult:
    manifest: Manifest
    lines: tuple[str, ...]  # the archive report's int8 section


def quantize_stage_directory(
    stage_dir: Path,
    manifest: Manifest,
    processors: Mapping[str, Any] | None,
    options: QuantizeOptions,
    warn: Callable[[str], None] = print,
) -> QuantizeResult:
    """Write the int8 stages into ``stage_dir``, measure them, rewrite the manifest; raises
    ``AccuracyError`` below the threshold unless ``options.allow_accuracy_loss``."""
    inputs = _calibration_set(stage_dir, manifest, processors, options, warn)
    try:
        calibrate_idx, held_idx = held_out_indices(len(inputs.feeds))
    except ValueError as exc:
        raise CalibrationError(f"--calibration {options.calibration}: {exc}") from None
    calibrate = [inputs.feeds[i] for i in calibrate_idx]
    held = [inputs.feeds[i] for i in held_idx]
    check = _Check(held, [_run(_session(stage_dir / manifest.whole_model), f) for f in held], manifest,
                   is_classifier(manifest.outputs, labelled=bool((processors or {}).get("labels"))))
    with tempfile.TemporaryDirectory(prefix="hetserve-int8-") as tmp:
        work = Path(tmp)
        # 1. Every method on the whole model: accuracy on the held-out inputs, speed in process.
        methods = METHODS if options.method == "auto" else (options.method,)
        whole_pre = _preprocessed(stage_dir / manifest.whole_model, work / "whole-pre.onnx")
        quantized: dict[str, Path] = {}
        for method in methods:
            quantized[method] = work / f"whole-{method}.onnx"
            quantize_file(whole_pre, quantized[method], method, calibrate, work)
        speedups = _speedups(stage_dir / manifest.whole_model, quantized, held)
        candidates = [Candidate(m, check.of(path), speedups[m]) for m, path in quantized.items()]
        choice = choose_method(candidates, options.min_accuracy)
        # 2. The chosen method for the whole model and every head and tail.
        with _ContentWeights(stage_dir, INT8_WEIGHTS_FILE, stage_dir / manifest.whole_model) as weights:
            whole_file = _int8_name(manifest.whole_model)
            _write_int8(quantized[choice.method], stage_dir / whole_file, weights)
            parts = [(part, *_quantize_partition(stage_dir, part, choice.method, calibrate, check, weights, work))
                     for part in manifest.partitions]
    accuracies = [("whole model", next(c.accuracy for c in candidates if c.method == choice.method)),
                  *((f"ratio {part.ratio:g} head -> tail", acc) for part, _, acc in parts)]
    verdict = judge(accuracies, options.min_accuracy)
    record = {
        "precision": INT8,
        "method": choice.method,
        "reason": choice.reason,
        "settings": METHOD_SETTINGS[choice.method],
        "calibration": {**inputs.describe(), "calibrated_on": len(calibrate), "held_out": len(held)},
        "threshold": {"metric": accuracies[0][1].metric, "min": options.min_accuracy},
        "passed": verdict.passed,
        "accuracy_loss_allowed": options.allow_accuracy_loss and not verdict.passed,
        "candidates": [
            {"method": c.method, "speedup_vs_float32_in_process": round(c.speedup, 3),
             "accuracy": c.accuracy.to_json()} for c in candidates
        ],
    }
    lines = _report(record, accuracies, options.min_accuracy)
    if not verdict.passed and not options.allow_accuracy_loss:
        raise AccuracyError(verdict.line(options.min_accuracy))
    if not verdict.passed:
        warn(f"warning: {verdict.line(options.min_accuracy)} (allowed: --allow-accuracy-loss)")

    def variant(files: dict[str, str], accuracy: Accuracy) -> StageVariant:
        return StageVariant(files, {**accuracy.to_json(), "passed": accuracy.value >= options.min_accuracy})

    written = [whole_file, INT8_WEIGHTS_FILE, *(f for _, files, _ in parts for f in files.values())]
    result = replace(
        manifest,
        partitions=tuple(replace(part, variants={INT8: variant(files, acc)}) for part, files, acc in parts),
        whole_variants={INT8: variant({"whole": whole_file}, accuracies[0][1])},
        quantization=record,
        files={**manifest.files, **{n: FileEntry(sha256_file(stage_dir / n), (stage_dir / n).stat().st_size)
                                    for n in written}},
    )
    write_manifest(result, stage_dir)
    return QuantizeResult(result, lines)


@dataclass(frozen=True)
class _Check:
    """The held-out inputs and the float model's outputs on them: what every variant is
    measured against."""

    held: Sequence[Feeds]
    reference: Sequence[Mapping[str, np.ndarray]]
    manifest: Manifest
    classifier: bool

    def of(self, whole: Path) -> Accuracy:
        session = _session(whole)
        return self.measure([_run(session, f) for f in self.held])

    def of_pipeline(self, head: Path, tail: Path) -> Accuracy:
        sessions = _session(head), _session(tail)
        names = {s.name for s in self.manifest.outputs}
        return self.measure([{n: v for n, v in run_pipeline(*sessions, f).items() if n in names}
                             for f in self.held])

    def measure(self, produced: Sequence[Mapping[str, np.ndarray]]) -> Accuracy:
        return measure(self.reference, produced, self.manifest.outputs, self.classifier)


# How each method is run (recorded in the manifest with the choice).
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    STATIC: {"format": "QDQ", "weights": "int8 per channel", "activations": "uint8",
             "calibration": "MinMax", "preprocessed": "quant_pre_process"},
    DYNAMIC: {"format": "dynamic (QOperator)", "ops": ["MatMul", "Gemm"], "weights": "int8 per channel",
              "activations": "uint8, ranges per run", "preprocessed": "quant_pre_process"},
    DYNAMIC_U8: {"format": "dynamic (QOperator)", "ops": ["MatMul", "Gemm"], "weights": "uint8 per channel",
                 "activations": "uint8, ranges per run", "preprocessed": "quant_pre_process"},
}


def quantize_file(src: Path, dst: Path, method: str, calibration: Sequence[Feeds], work: Path) -> None:
    """Quantize one ONNX file; its graph inputs and outputs keep their names and dtypes."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        """The feeds, in ranges ``CalibStridedMinMax`` asks for."""

        def __init__(self, feeds: Sequence[Feeds]) -> None:
            self._feeds = list(feeds)
            self._next = iter(self._feeds)

        def get_next(self) -> Feeds | None:
            return next(self._next, None)

        def __len__(self) -> int:
            return len(self._feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._next = iter(self._feeds[start_index:end_index])

    with _quiet_quantizer():
        if method == STATIC:
            names = [i.name for i in _graph_inputs(onnx.load(str(src), load_external_data=False))]
            feeds = [{n: f[n] for n in names} for f in calibration]
            quantize_static(
                str(src), str(dst), Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                # Ranges merged every few runs, so the activations of hundreds of runs are never
                # all held. (Not CalibMaxIntermediateOutputs: in ORT 1.31 it drops each full
                # chunk without computing its ranges.)
                extra_options={"CalibStridedMinMax": calibration_stride(len(feeds))},
            )
        elif method in (DYNAMIC, DYNAMIC_U8):
            quantize_dynamic(
                str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                weight_type=QuantType.QInt8 if method == DYNAMIC else QuantType.QUInt8,
            )
        else:
            raise ValueError(f"unknown quantization method {method!r}")
    check_boundary(src, dst)


def calibration_stride(count: int, most: int = 8) -> int:
    """The largest chunk of at most ``most`` runs that divides ``count`` (ORT requires it)."""
    return max(d for d in range(1, min(most, count) + 1) if count % d == 0)


def check_boundary(src: Path, dst: Path) -> None:
    """The quantized graph takes and gives exactly what the float one does (float32 cut tensors)."""
    before, after = (onnx.load(str(p), load_external_data=False) for p in (src, dst))
    for what, old, new in (("inputs", _graph_inputs(before), _graph_inputs(after)),
                           ("outputs", list(before.graph.output), list(after.graph.output))):
        was = [(v.name, v.type.tensor_type.elem_type) for v in old]
        now = [(v.name, v.type.tensor_type.elem_type) for v in new]
        if was != now:
            raise QuantizeError(f"{dst.name}: quantizing changed the graph's {what} from {was} to {now}")


def _quantize_partition(
    stage_dir: Path,
    part: Partition,
    method: str,
    calibrate: Sequence[Feeds],
    check: _Check,
    weights: SharedWeights,
    work: Path,
) -> tuple[dict[str, str], Accuracy]:
    """Head and tail quantized with ``method`` (the tail calibrated on the float head's
    outputs: what it gets from a float head, and what an int8 head approximates); their files
    and the accuracy of int8 head -> int8 tail."""
    float_head = _session(stage_dir / part.head)
    tail_feeds = [{**f, **_run(float_head, f)} for f in calibrate]
    files: dict[str, str] = {}
    for stage, source, feeds in (("head", part.head, calibrate), ("tail", part.tail, tail_feeds)):
        pre = _preprocessed(stage_dir / source, work / f"{stage}-pre.onnx")
        out = work / f"{stage}-{method}.onnx"
        quantize_file(pre, out, method, feeds, work)
        files[stage] = _int8_name(source)
        _write_int8(out, stage_dir / files[stage], weights)
    return files, check.of_pipeline(stage_dir / files["head"], stage_dir / files["tail"])


def _calibration_set(
    stage_dir: Path,
    manifest: Manifest,
    processors: Mapping[str, Any] | None,
    options: QuantizeOptions,
    warn: Callable[[str], None],
) -> CalibrationSet:
    if options.calibration is not None:
        found = read_directory(options.calibration, manifest, processors, stage_dir)
        for note in found.notes:
            warn(f"note: --calibration: {note}")
        return found
    warn(RANDOM_WARNING)
    rng = np.random.default_rng(options.seed)
    return CalibrationSet(tuple(_example_inputs(manifest, rng) for _ in range(RANDOM_INPUTS)), "random")


def _example_inputs(manifest: Manifest, rng: np.random.Generator) -> Feeds:
    """One random batch-1 input from the project's example-input generator, in the ranges the
    manifest records for each input (ids below their tables, masks in {0, 1})."""
    from handlers.artifact.example_inputs import example_feeds
    from handlers.protocol.dynamic_dims import DynamicDims

    dims = DynamicDims.from_json(manifest.dynamic_dims)
    return example_feeds(manifest.inputs, 1, rng, dims.sizes, dims.axes)


def _speedups(float_path: Path, quantized: Mapping[str, Path], held: Sequence[Feeds]) -> dict[str, float]:
    """float32 time / each quantized model's time on one batch: in alternating rounds, each
    model runs for at least TIMING_ROUND_S; the best round's mean per run counts (a shared
    machine's noise only ever slows a round down)."""
    feeds = _timing_batch(held)
    threads = len(os.sched_getaffinity(0))
    sessions = {"float32": _session(float_path, threads),
                **{m: _session(p, threads) for m, p in quantized.items()}}
    best = dict.fromkeys(sessions, float("inf"))
    for session in sessions.values():
        session.run(None, feeds)  # first run: allocation, kernel selection
    for _ in range(TIMING_ROUNDS):
        for name, session in sessions.items():
            runs, started = 0, time.perf_counter()
            while runs == 0 or time.perf_counter() - started < TIMING_ROUND_S:
                session.run(None, feeds)
                runs += 1
            best[name] = min(best[name], (time.perf_counter() - started) / runs)
    return {m: best["float32"] / best[m] for m in quantized}


def _timing_batch(held: Sequence[Feeds]) -> Feeds:
    """Up to TIMING_BATCH held-out inputs stacked, when their shapes agree (text may not)."""
    first = held[0]
    same = [f for f in held if all(f[n].shape == first[n].shape for n in first)][:TIMING_BATCH]
    return {n: np.concatenate([f[n] for f in same]) for n in first}


def _report(record: Mapping[str, Any], accuracies: Sequence[tuple[str, Accuracy]], minimum: float) -> tuple[str, ...]:
    calibration = record["calibration"]
    lines = [
        f"int8: {record['method']} quantization ({record['reason']})",
        f"int8: calibrated on {calibration['calibrated_on']} {calibration['source']} inputs, "
        f"checked on {calibration['held_out']} held out; threshold {record['threshold']['metric']} >= {minimum:g}",
    ]
    for label, acc in accuracies:
        top1 = f"top-1 {acc.top1_agreement:.4f}  " if acc.top1_agreement is not None else ""
        lines.append(
            f"int8: {label:<24} {top1}cosine {acc.cosine_mean:.5f} (min {acc.cosine_min:.5f})  "
            f"max|diff| {acc.max_abs_diff:.3g} ({acc.max_abs_diff_of_largest:.1%} of the largest output)  "
            f"mean|diff| {acc.mean_abs_diff:.3g}  {'ok' if acc.value >= minimum else 'BELOW'}"
        )
    return tuple(lines)


def _int8_name(float_file: str) -> str:
    return f"{float_file.removesuffix('.onnx')}-int8.onnx"


def _preprocessed(src: Path, dst: Path) -> Path:
    """ORT's recommended pre-processing (shape inference, graph optimisation); a graph that
    symbolic shape inference cannot handle is pre-processed without it, then not at all."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for skip_symbolic in (False, True):
        try:
            with _quiet_quantizer():
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic)
            return dst
        except Exception:  # noqa: BLE001 - shape inference fails in many ways; the next try is plainer
            continue
    return src


def _write_int8(src: Path, dst: Path, weights: SharedWeights) -> None:
    save_model(weights.externalize(onnx.load(str(src))), dst)
    weights.flush()


class _ContentWeights(SharedWeights):
    """The int8 stages' weights, stored by content: a tensor the float stages already hold
    (an embedding table dynamic quantization leaves float, say) points into their weights file;
    any other is stored once in this file, however many int8 stages hold it. By content, not
    name: a name (a bias scaled by its input's calibrated range) may hold other bytes in
    another stage."""

    def __init__(self, directory: Path, filename: str, float_model: Path) -> None:
        super().__init__(directory, filename)
        self._known = _external_tensors(float_model)  # sha256 -> (location, offset, length)

    def externalize(self, model: onnx.ModelProto) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        for tensor in out.graph.initializer:
            data = _tensor_bytes(tensor)
            if len(data) < INLINE_LIMIT:
                continue
            key = hashlib.sha256(data).hexdigest()
            if key not in self._known:
                position = self._file.tell()
                padding = (-position) % (PAGE if len(data) >= 16 * PAGE else 64)
                self._file.write(b"\0" * padding + data)
                self._known[key] = (self.filename, position + padding, len(data))
            _clear_data(tensor)
            _point_at(tensor, *self._known[key])
        return out


def _external_tensors(model_path: Path) -> dict[str, tuple[str, int, int]]:
    """sha256 of each external tensor's bytes -> where they are (file, offset, length)."""
    model = onnx.load(str(model_path), load_external_data=False)
    found: dict[str, tuple[str, int, int]] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = {e.key: e.value for e in tensor.external_data}
        offset, length = int(entry.get("offset", 0)), int(entry["length"])
        with open(model_path.parent / entry["location"], "rb") as f:
            f.seek(offset)
            found[hashlib.sha256(f.read(length)).hexdigest()] = (entry["location"], offset, length)
    return found


def _tensor_bytes(tensor: onnx.TensorProto) -> bytes:
    from onnx import numpy_helper

    return tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def _session(path: Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session: Any, feeds: Feeds) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name: feeds[i.name] for i in session.get_inputs()}
    return dict(zip(names, session.run(names, wanted), strict=True))


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ORT's quantizer logs advice at INFO/WARNING on the root logger for every graph."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
