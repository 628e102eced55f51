"""The ``hetserve:`` section of model-config.yaml, as one validated dataclass.

Unknown keys are errors, not silently ignored: a typo in a knob must not quietly serve defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from handlers.artifact.manifest import FLOAT32, PRECISIONS
from handlers.artifact.state_dir import state_file
from handlers.executors.cuda_graph import FIXED_BATCH_NEEDED
from handlers.processors.config import ProcessorConfigError, ProcessorsConfig
from handlers.protocol.validation import RequestLimits

if TYPE_CHECKING:
    from handlers.testing.faults import FaultSpec

DEVICE_CHOICES = ("auto", "cpu", "cuda")
# TorchServe's own default when model-config.yaml has no responseTimeout.
TORCHSERVE_RESPONSE_TIMEOUT_S = 120.0
# Share of responseTimeout a batch may use: TorchServe kills a worker that answers later.
REQUEST_BUDGET_SHARE = 0.9


class ConfigError(ValueError):
    """A knob in model-config.yaml is wrong; the message names it."""


@dataclass(frozen=True)
class RuntimeConfig:
    ratio: float | None = None  # None: the manifest's default; >= 1.0: serve the whole model
    core_groups: str = "numa"
    cpu_head_groups: int = 0  # CPU-only: groups reserved for the head (0 = head may use any group)
    micro_batch: int = 0  # 0: split each batch evenly over the head executors
    tail_devices: str = "auto"
    head_devices: str = "auto"
    cuda_streams: int = 2
    cuda_device: int = 0
    spinning: bool = False
    ewma_alpha: float = 0.3
    calibration_runs: int = 3
    state_dir: str | None = None
    stage_timeout_s: float = 30.0
    # The whole batch's budget; None: 0.9 x responseTimeout (set by from_model_yaml).
    request_timeout_s: float | None = None
    quarantine_after: int = 3  # failures in a row that take an executor out of placement
    probe_backoff_s: float = 1.0  # first re-probe of a quarantined executor; doubles on failure
    probe_backoff_max_s: float = 60.0
    save_interval_s: float = 30.0
    # TorchServe's batchSize (set by from_model_yaml): CUDA executors warm every size up to it.
    batch_size: int = 1
    # Pad GPU runs to the largest micro-batch: one input shape per CUDA session (see plan).
    cuda_fixed_batch: bool = True
    # Run each fixed-batch GPU stage as a captured CUDA graph (handlers.executors.cuda_graph); off until
    # measured on a GPU.
    cuda_graph: bool = False
    # CPU only, ratio left to the archive: at load, time a batch through the split layout and
    # through the whole model on one group of every core, and keep the faster
    # (handlers.runtime.layout_choice). The shipped model-config.yaml turns it on.
    compare_whole: bool = False
    # float32 or int8 (an archive built with --quantize int8): the stages CPU executors load.
    # GPU executors always run the float stages. Chosen at load, like the ratio.
    precision: str = FLOAT32
    limits: RequestLimits = field(default_factory=RequestLimits)
    # Image/text in, labels out (handlers/processors); none declared: tensors in and out.
    processors: ProcessorsConfig = field(default_factory=ProcessorsConfig)
    faults: tuple[FaultSpec, ...] = ()  # tests only: needs HETSERVE_ENABLE_FAULTS=1

    def __post_init__(self) -> None:
        _check_types(self)
        if self.ratio is not None and not self.ratio > 0.0:
            raise ConfigError(f"hetserve.ratio must be > 0 (or null), got {self.ratio!r}")
        _check_policy(self.core_groups)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"hetserve.precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("tail_devices", "head_devices"):
            if getattr(self, name) not in DEVICE_CHOICES:
                raise ConfigError(
                    f"hetserve.{name} must be one of {DEVICE_CHOICES}, got {getattr(self, name)!r}"
                )
        for name, low in (
            ("cpu_head_groups", 0),
            ("micro_batch", 0),
            ("cuda_streams", 1),
            ("cuda_device", 0),
            ("calibration_runs", 0),
            ("quarantine_after", 1),
            ("batch_size", 1),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"hetserve.{name} must be an integer >= {low}, got {value!r}")
        for name in ("spinning", "cuda_fixed_batch", "cuda_graph", "compare_whole"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"hetserve.{name} must be true or false, got {getattr(self, name)!r}")
        if self.cuda_graph and not self.cuda_fixed_batch:
            raise ConfigError(FIXED_BATCH_NEEDED)
        if not 0.0 < self.ewma_alpha <= 1.0:
            raise ConfigError(f"hetserve.ewma_alpha must be in (0, 1], got {self.ewma_alpha!r}")
        for name in ("stage_timeout_s", "save_interval_s", "probe_backoff_s", "probe_backoff_max_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"hetserve.{name} must be > 0")
        if self.request_timeout_s is not None and not self.request_timeout_s > self.stage_timeout_s:
            raise ConfigError(
                f"hetserve.stage_timeout_s ({self.stage_timeout_s:g}) must be shorter than the "
                f"request budget ({self.request_timeout_s:g} s, 0.9 x responseTimeout unless "
                "hetserve.request_timeout_s sets it)"
            )

    @classmethod
    def from_model_yaml(cls, model_yaml: Mapping[str, Any] | None) -> RuntimeConfig:
        section = dict((model_yaml or {}).get("hetserve") or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(
                f"unknown hetserve option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        try:
            limits = RequestLimits.from_mapping(section.pop("limits", None) or {})
            faults = _test_faults(section.pop("faults", None))
            try:
                processors = ProcessorsConfig.from_mapping(section.pop("processors", None))
            except ProcessorConfigError as exc:
                raise ConfigError(str(exc)) from None
            response_s = float((model_yaml or {}).get("responseTimeout") or TORCHSERVE_RESPONSE_TIMEOUT_S)
            section.setdefault("batch_size", int((model_yaml or {}).get("batchSize") or 1))
            if section.get("request_timeout_s") is None:
                section["request_timeout_s"] = REQUEST_BUDGET_SHARE * response_s
            elif not float(section["request_timeout_s"]) < response_s:
                raise ConfigError(
                    f"hetserve.request_timeout_s ({section['request_timeout_s']}) must be shorter "
                    f"than responseTimeout ({response_s:g} s): TorchServe kills a worker that "
                    "answers later"
                )
            return cls(**section, limits=limits, faults=faults, processors=processors)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"bad hetserve option: {exc}") from None

    def state_path(
        self, model_name: str, manifest_digest: str, model_dir: str | Path = "", key: str = ""
    ) -> Path:
        # Expanded, absolute, outside the model directory, under an allowed root (state_dir.py);
        # ``key`` names the served stages and core-group shape (history_key.py).
        return state_file(model_name, manifest_digest, self.state_dir, key, model_dir or None)


def _test_faults(section: Any) -> tuple[FaultSpec, ...]:
    """The faults section, for tests only: the test-support module loads only when one is given."""
    if not section:
        return ()
    from handlers.testing.faults import parse_faults

    return parse_faults(section)


def _check_policy(policy: str) -> None:
    if policy in ("numa", "socket"):
        return
    kind, _, size = policy.partition(":")
    if kind == "size" and size.isdigit() and int(size) > 0:
        return
    raise ConfigError(f"hetserve.core_groups must be numa, socket or size:K, got {policy!r}")


# Knobs whose YAML type must be checked before any comparison: "0.8" or true for a ratio, 2 for a
# policy, 123 for a path would otherwise fail as Python errors that do not name the knob, or
# (ratio: true == 1) silently serve the whole model.
_NUMBERS = ("ratio", "ewma_alpha", "stage_timeout_s", "request_timeout_s", "probe_backoff_s",
            "probe_backoff_max_s", "save_interval_s")
_STRINGS = ("core_groups", "tail_devices", "head_devices", "state_dir", "precision")
_OPTIONAL = ("ratio", "request_timeout_s", "state_dir")


def _check_types(config: RuntimeConfig) -> None:
    for name in _NUMBERS + _STRINGS:
        value = getattr(config, name)
        if value is None and name in _OPTIONAL:
            continue
        if name in _NUMBERS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(
                    f"hetserve.{name} must be a number{' or null' if name in _OPTIONAL else ''}, "
                    f"got {value!r} ({type(value).__name__})"
                )
        elif not isinstance(value, str):
            raise ConfigError(
                f"hetserve.{name} must be a string{' or null' if name in _OPTIONAL else ''}, "
                f"got {value!r} ({type(value).__name__})"
            )
