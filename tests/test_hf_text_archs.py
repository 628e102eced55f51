"""Text models archived as the README shows, with the default cost model (profiling), for six
Hugging Face families: BERT (2 token types), RoBERTa and XLM-RoBERTa (1 token type, positions
computed from the ids), DistilBERT (no token types), ALBERT and ELECTRA (embeddings narrower
than the hidden size). Each is a tiny config (hidden 32, one layer) with random weights and the
real MiniLM tokenizer.json; every archive is served by one TorchServe (a worker each) and must
answer real sentences as transformers + torch do on the same tokenizer's ids.

Issue 22: the profiler drew token type ids from [0, 4), so every standard BERT directory died
in profiling (ORT's Gather "indices element out of data bounds"), and the runtime's calibration
drew from [0, 2), which overflows RoBERTa's one-row token type table. Now every example run
draws from the ranges the manifest records.
"""

from __future__ import annotations

import inspect
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from hetserve.cli import main
from hetserve.tsprocess import start_torchserve
from tests.hf_fixtures import TEXT_ARCHS, TEXT_LABELS, write_text_dir

pytestmark = pytest.mark.server
pytest.importorskip("transformers")

SENTENCES = [
    "The film was a delight from start to finish.",
    "I would not watch it again; the plot made no sense at all!",
    "Café prices rose 12% in 2023, according to the Bank of England.",
]
TYPE_ROWS = {"bert": 2, "roberta": 1, "xlm-roberta": 1, "albert": 2, "electra": 2}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-text")
    return {arch: write_text_dir(root / arch, arch) for arch in TEXT_ARCHS}


@pytest.fixture(scope="module")
def store(dirs, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("text-store")
    for arch, directory in dirs.items():
        # The README's command (no --cost: ONNX Runtime profiles the graph), one ratio to keep
        # the cut cheap, and one worker per model: six models share a small box.
        assert main([
            "archive", "--model", f"hf:{directory}", "--task", "text-classification",
            "--model-name", arch, "--export-path", str(store), "--ratios", "0.5", "--quiet",
            "--set", "minWorkers=1", "--set", "maxWorkers=1", "--set", "hetserve.calibration_runs=1",
        ]) == 0, arch
    return store


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    ts = start_torchserve(tmp_path_factory.mktemp("ts"), store, {a: f"{a}.mar" for a in TEXT_ARCHS})
    yield ts
    ts.stop()


@pytest.fixture(scope="module")
def reference(dirs):
    """arch -> (texts -> logits): transformers on the tokenizer's own ids, each text unpadded."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification

    models = {}
    for arch, directory in dirs.items():
        model = AutoModelForSequenceClassification.from_pretrained(directory, local_files_only=True).eval()
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        models[arch] = (model, tokenizer, "token_type_ids" in inspect.signature(model.forward).parameters)

    def logits(arch: str, texts: list[str]) -> np.ndarray:
        model, tokenizer, types = models[arch]
        rows = []
        for text in texts:
            e = tokenizer.encode(text)
            kwargs = {"input_ids": torch.tensor([e.ids]), "attention_mask": torch.tensor([e.attention_mask])}
            if types:
                kwargs["token_type_ids"] = torch.tensor([e.type_ids])
            with torch.no_grad():
                rows.append(model(**kwargs).logits.numpy()[0])
        return np.stack(rows)

    return logits


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def manifest_inputs(store: Path, arch: str) -> dict[str, dict]:
    with zipfile.ZipFile(store / f"{arch}.mar") as z:
        manifest = json.loads(z.read("hetserve-manifest.json"))
    return {spec["name"]: spec for spec in manifest["inputs"]}


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_the_archive_records_each_inputs_range_and_was_profiled(store, arch):
    inputs = manifest_inputs(store, arch)
    assert inputs["input_ids"]["values"] == {"low": 0, "high": 30522, "integers": True}
    assert inputs["attention_mask"]["values"] == {"low": 0, "high": 2, "integers": True}
    if arch in TYPE_ROWS:
        assert inputs["token_type_ids"]["values"]["high"] == TYPE_ROWS[arch]
    else:
        assert "token_type_ids" not in inputs
    with zipfile.ZipFile(store / f"{arch}.mar") as z:
        assert json.loads(z.read("profile.json"))["source"] == "profile"


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_plain_text_and_text_lists_answer_as_transformers_does(server, reference, arch):
    want = reference(arch, SENTENCES)
    # The sentences really differ to the model, so equal answers are evidence.
    assert np.abs(want[0] - want[1]).max() > 1e-2

    resp = server.predict(arch, SENTENCES[0].encode(), "text/plain")
    assert resp.status == 200, resp.body
    body = resp.json()
    assert set(body) == set(TEXT_LABELS)
    expected = softmax(want[0])
    for name, score in body.items():
        assert score == pytest.approx(float(expected[TEXT_LABELS.index(name)]), abs=1e-4), name

    resp = server.predict(arch, json.dumps({"text": SENTENCES}).encode())
    assert resp.status == 200, resp.body
    rows = resp.json()
    assert len(rows) == len(SENTENCES)
    for row, expected in zip(rows, softmax(want), strict=True):
        for name, score in row.items():
            assert score == pytest.approx(float(expected[TEXT_LABELS.index(name)]), abs=1e-4), name

    raw = server.predict(arch, json.dumps({"text": SENTENCES}).encode(), headers={"X-Hetserve-Raw": "true"})
    assert raw.status == 200, raw.body
    got = np.asarray(raw.json()["outputs"]["logits"])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
