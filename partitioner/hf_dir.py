"""``hf:DIR``: a local Hugging Face ``save_pretrained`` directory as a model hetserve can archive.

Only ``config.json`` and ``*.safetensors`` weights are read to build the model (nothing is
unpickled; ``local_files_only``: never a hub download), with ``transformers``' Auto class for
the task. The model is wrapped in a module with explicit positional inputs named as the model
names them (``pixel_values``; ``input_ids``, ``attention_mask``, ``token_type_ids``) and one
output, ``logits``. The directory's image processor config, tokenizer and ``id2label`` become
the archive's processors (``hetserve.processors``) and the files they read.

``transformers`` is needed here only (``pip install hetserve[hf]``); the serving worker is not.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from partitioner.loaded import LoadedModel, ModelLoadError

TASKS = ("image-classification", "text-classification")
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_MAX_LENGTH = 128
LABELS_FILE = "labels.json"
TOKENIZER_FILE = "tokenizer.json"
# Pillow's resampling codes as Hugging Face image processors store them.
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class _Logits(nn.Module):
    """The wrapped model's ``logits`` (ModelOutput unwrapped) from named inputs.

    The exporters need a ``forward`` with one positional parameter per input (``*args`` is
    traced as a single tuple), hence one subclass per input count below.
    """

    def __init__(self, model: nn.Module, input_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names

    def _logits(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs, strict=True))).logits


class _Logits1(_Logits):
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self._logits(a)


class _Logits2(_Logits):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._logits(a, b)


class _Logits3(_Logits):
    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self._logits(a, b, c)


_WRAPPERS = {1: _Logits1, 2: _Logits2, 3: _Logits3}


def load_hf_dir(spec: str, task: str | None, max_length: int | None = None) -> LoadedModel:
    """The model with ``processors`` (hetserve.processors section) and ``files`` to pack."""
    directory = Path(spec.removeprefix("hf:")).expanduser()
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{spec!r}: no config.json in {str(directory)!r} (a save_pretrained directory)")
    if not any(directory.glob("*.safetensors")):
        raise ModelLoadError(
            f"{spec!r}: no .safetensors weights in {str(directory)!r}; hetserve never unpickles "
            ".bin/.pt checkpoints. Re-save once where you trust it: "
            "model.save_pretrained(DIR, safe_serialization=True)"
        )
    if task not in TASKS:
        raise ModelLoadError(f"{spec!r}: give --task, one of {', '.join(TASKS)} (got {task!r})")
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(
            "hf: models need transformers to archive (pip install 'hetserve[hf]'); serving does not"
        ) from None
    auto = (
        transformers.AutoModelForImageClassification
        if task == "image-classification"
        else transformers.AutoModelForSequenceClassification
    )
    _check_weights(spec, directory)
    from safetensors import SafetensorError

    try:
        model = auto.from_pretrained(
            str(directory), local_files_only=True, use_safetensors=True,
            trust_remote_code=False, attn_implementation="eager",
        ).eval()
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise ModelLoadError(
            f"{spec!r}: transformers could not build a {task} model: {_one_line(exc)}"
        ) from None
    config = model.config
    processors: dict[str, Any] = {"labels": _labels_config(config)}
    files = {LABELS_FILE: _labels_file(config)}
    if task == "image-classification":
        image = image_config_from_hf(directory, config)
        processors["image"] = image
        size = image["crop"] or image["size"]
        channels = int(getattr(config, "num_channels", 3))
        names: tuple[str, ...] = ("pixel_values",)
        example: tuple[torch.Tensor, ...] = (torch.randn(2, channels, *size, generator=torch.Generator().manual_seed(0)),)
    else:
        names = _token_inputs(model)
        length = _max_length(directory, config, max_length)
        processors["text"] = _text_config(directory, length)
        files[TOKENIZER_FILE] = (directory / TOKENIZER_FILE).read_bytes()
        ids = torch.randint(4, int(config.vocab_size), (2, length), generator=torch.Generator().manual_seed(0))
        by_name = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        example = tuple(by_name[n] for n in names)
    return LoadedModel(
        source=spec, module=_WRAPPERS[len(names)](model, names).eval(), example_inputs=example,
        input_names=names, output_names=("logits",), processors=processors, files=files,
    )


def _check_weights(spec: str, directory: Path) -> None:
    """Each .safetensors file's header read before transformers sees it: one line per bad file."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as weights:
                problem = "" if weights.keys() else "it holds no tensors"
        except (SafetensorError, OSError) as exc:
            problem = _one_line(exc)
        if problem:
            raise ModelLoadError(
                f"{spec!r}: {path.name} is not a readable safetensors file ({problem}); "
                "re-save the model with save_pretrained(DIR, safe_serialization=True)"
            )


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _labels_config(config) -> dict[str, Any]:
    multi = getattr(config, "problem_type", None) == "multi_label_classification"
    count = int(getattr(config, "num_labels", 0) or len(getattr(config, "id2label", {}) or {}) or 5)
    return {
        "labels": LABELS_FILE,
        "activation": "sigmoid" if multi else "softmax",
        "top_k": min(5, count),
    }


def _labels_file(config) -> bytes:
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = [id2label.get(i, str(i)) for i in range(max(id2label, default=-1) + 1)]
    return (json.dumps(names, indent=1) + "\n").encode()


def image_config_from_hf(directory: Path, config, path: Path | None = None) -> dict[str, Any]:
    """A Hugging Face preprocessor_config.json as hetserve's image processor config."""
    path = path or directory / "preprocessor_config.json"
    hf = json.loads(path.read_text()) if path.is_file() else {}
    default = int(getattr(config, "image_size", 224))
    size = _hw_or_edge(hf.get("size"), default) if hf.get("do_resize", True) else (default, default)
    crop = _hw_or_edge(hf.get("crop_size"), default) if hf.get("do_center_crop", False) else None
    if isinstance(crop, int):
        crop = (crop, crop)
    normalize = hf.get("do_normalize", True)
    channels = int(getattr(config, "num_channels", 3))
    return {
        "size": list(size) if isinstance(size, tuple) else size,
        "crop": list(crop) if crop else None,
        "resample": _PIL_RESAMPLE.get(hf.get("resample", 2), "bilinear"),
        "rescale": float(hf.get("rescale_factor", 1 / 255)) if hf.get("do_rescale", True) else 1.0,
        "mean": [float(v) for v in hf.get("image_mean", [0.5] * channels)] if normalize else [0.0] * channels,
        "std": [float(v) for v in hf.get("image_std", [0.5] * channels)] if normalize else [1.0] * channels,
        "channels": "L" if channels == 1 else "RGB",
    }


def _hw_or_edge(size: Any, default: int) -> int | tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, Mapping):
        if "height" in size and "width" in size:
            return (int(size["height"]), int(size["width"]))
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
    return (default, default)


def _token_inputs(model: nn.Module) -> tuple[str, ...]:
    accepted = inspect.signature(model.forward).parameters
    uses_types = int(getattr(model.config, "type_vocab_size", 0) or 0) > 0
    return tuple(
        name for name in TOKEN_INPUTS
        if name in accepted and (name != "token_type_ids" or uses_types)
    )


def _tokenizer_config(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _max_length(directory: Path, config, requested: int | None) -> int:
    ceiling = int(getattr(config, "max_position_embeddings", DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH)
    model_max = _tokenizer_config(directory).get("model_max_length")
    if isinstance(model_max, int) and 0 < model_max < ceiling:
        ceiling = model_max
    length = requested or min(DEFAULT_MAX_LENGTH, ceiling)
    if length > ceiling:
        raise ModelLoadError(f"--max-length {length} exceeds the model's limit of {ceiling} tokens")
    return length


def _text_config(directory: Path, length: int) -> dict[str, Any]:
    if not (directory / TOKENIZER_FILE).is_file():
        raise ModelLoadError(
            f"no {TOKENIZER_FILE} in {str(directory)!r}: text models need a fast tokenizer "
            "(tokenizer.save_pretrained(DIR) writes it)"
        )
    pad = _tokenizer_config(directory).get("pad_token", "[PAD]")
    if isinstance(pad, Mapping):
        pad = pad.get("content", "[PAD]")
    return {"tokenizer": TOKENIZER_FILE, "max_length": length, "pad_token": str(pad)}
