"""Evidence that the stages compute the model: outputs compared with relative + absolute
tolerance, and a refusal when the evidence proves nothing.

The inputs are drawn in each input's valid range (handlers.artifact.example_inputs, with the
ranges of partitioner.value_ranges). An output that is all ~0 or constant on those inputs makes
any comparison pass, so it is refused (HF's random init leaves MobileNetV2's logits ~1e-21 and
EfficientNet's at exactly 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

RTOL = 1e-3  # stages vs torch: float32 kernels fused differently, summed in another order
ATOL_OF_SCALE = 1e-4  # absolute part, as a share of the output's largest magnitude
DEGENERATE_SCALE = 1e-6


class EvidenceError(ValueError):
    """The verification inputs give outputs that cannot tell a right model from a wrong one."""


@dataclass(frozen=True)
class Comparison:
    max_abs_err: float
    worst: float  # max over elements of |got - want| / (atol + rtol * |want|); <= 1 passes
    scale: float  # the largest |want|


def check_evidence(outputs: Mapping[str, np.ndarray], source: str) -> dict[str, float]:
    """Each output's scale (largest magnitude); ``EvidenceError`` when one is ~0 or constant."""
    scales = {}
    for name, value in outputs.items():
        values = np.asarray(value, dtype=np.float64)
        if values.size == 0:
            continue
        scale = float(np.max(np.abs(values)))
        spread = float(np.ptp(values))
        if scale < DEGENERATE_SCALE or spread <= DEGENERATE_SCALE * scale:
            what = f"all ~0 (largest magnitude {scale:.3g})" if scale < DEGENERATE_SCALE else (
                f"constant ({float(values.flat[0]):.6g} everywhere)"
            )
            raise EvidenceError(
                f"{source}: output {name!r} is {what} on the verification inputs, so comparing "
                "the stages with it would prove nothing. This happens with randomly initialised "
                "weights (e.g. Hugging Face's init of MobileNetV2 and EfficientNet heads): load "
                "trained weights with --weights, or re-initialise the model in its factory "
                "(torch.nn.init.normal_(p, std=0.05) for each parameter); check too that the "
                "example inputs are in the model's range."
            )
        scales[name] = scale
    return scales


def compare(got: np.ndarray, want: np.ndarray, rtol: float = RTOL,
            atol_of_scale: float = ATOL_OF_SCALE) -> Comparison:
    want64 = np.asarray(want, dtype=np.float64)
    got64 = np.asarray(got, dtype=np.float64)
    if got64.shape != want64.shape:
        return Comparison(float("inf"), float("inf"), 0.0)
    if want64.size == 0:
        return Comparison(0.0, 0.0, 0.0)
    scale = float(np.max(np.abs(want64)))
    diff = np.abs(got64 - want64)
    bound = atol_of_scale * max(scale, DEGENERATE_SCALE) + rtol * np.abs(want64)
    return Comparison(float(diff.max()), float((diff / bound).max()), scale)


def other_sizes(sizes: Mapping[str, int], bounds: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """A second setting of every dynamic dim, to verify the stages away from the
    representative one: half of it (at least 2), inside the bounds."""
    out = {}
    for symbol, size in sizes.items():
        low, high = bounds.get(symbol, (1, 1 << 31))
        other = max(2, size // 2) if size > 2 else size + 1
        out[symbol] = min(max(other, low), high)
    return out
