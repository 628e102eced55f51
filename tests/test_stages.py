"""Head and tail stages, built for real from exported tiny models and run with ONNX Runtime."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from models import TINY_MODELS, tiny_onnx

from handlers.artifact.example_inputs import example_feeds
from handlers.artifact.manifest import ManifestError, load_verified_manifest
from partitioner.build import CutOptions, build_stage_directory
from partitioner.export import export_onnx
from partitioner.loading import load_model
from partitioner.onnx_graph import build_task_graph
from partitioner.profile import flops_costs
from partitioner.stages import StageError, run_pipeline, split_model


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", TINY_MODELS)
def test_stages_of_every_tiny_model_reproduce_the_whole_model(name, tmp_path):
    model = tiny_onnx(name)
    out = tmp_path / name
    result = build_stage_directory(
        model, flops_costs(model), out, name, CutOptions(ratios=(0.5, 0.8), allow_off_target=True),
        progress=False,
    )
    assert [r.ratio for r in result.rows] == [0.5, 0.8]
    for row in result.rows:
        assert row.valid and row.max_abs_err <= 1e-4
    manifest = load_verified_manifest(out)  # every file present with its SHA-256
    whole = session(out / manifest.whole_model)
    rng = np.random.default_rng(7)
    # A batch size the builder's own verification did not use.
    feeds = example_feeds(manifest.inputs, 3, rng)
    (want,) = whole.run(None, feeds)
    for part in manifest.partitions:
        got = run_pipeline(session(out / part.head), session(out / part.tail), feeds)
        np.testing.assert_allclose(got[manifest.outputs[0].name], want, atol=1e-4, rtol=0)
        assert 0.0 < part.achieved_ratio < 1.0
        assert part.cut_bytes_per_sample == sum(
            int(np.prod(t.shape[1:])) * np.dtype(t.dtype).itemsize for t in part.cut_tensors
        )


def test_every_node_lands_in_exactly_one_stage():
    model = tiny_onnx("googlenet-tiny")
    task = build_task_graph(model, flops_costs(model))
    from partitioner.cuts import find_cut

    cut = find_cut(task.graph, 0.7)
    pair = split_model(model, task, cut.tail)
    head = {n.name for n in pair.head.graph.node} - set(task.constant_nodes)
    tail = {n.name for n in pair.tail.graph.node} - set(task.constant_nodes)
    assert head.isdisjoint(tail)
    assert head | tail == set(task.node_names)
    assert tail == {task.node_names[i] for i in cut.tail}


def test_weights_are_stored_once_for_all_stages(tmp_path):
    model = tiny_onnx("resnet18-tiny")
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    build_stage_directory(model, flops_costs(model), tmp_path, "r", CutOptions(ratios=(0.6, 0.75, 0.9), allow_off_target=True), progress=False)
    shared = (tmp_path / "weights.bin").stat().st_size
    assert weight_bytes * 0.95 <= shared <= weight_bytes * 1.1
    graphs = sum(p.stat().st_size for p in tmp_path.glob("*.onnx"))
    assert graphs < weight_bytes / 4  # seven graph files, no copies of the weights


def test_an_invalid_split_is_refused():
    model = tiny_onnx("resnet18-tiny")
    task = build_task_graph(model, flops_costs(model))
    first = task.graph.topological_order[0]
    with pytest.raises(StageError, match="tail -> head"):
        split_model(model, task, {first})  # the very first node in the tail feeds the head


def test_model_outputs_made_by_the_head_pass_through(tmp_path):
    factory = tmp_path / "two_outputs.py"
    factory.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class TwoHeads(nn.Module):
            def __init__(self):
                super().__init__()
                self.early = nn.Conv2d(3, 4, 3, padding=1)
                self.late = nn.Sequential(*[nn.Conv2d(4, 4, 3, padding=1) for _ in range(6)])
                self.fc = nn.Linear(4, 5)

            def forward(self, x):
                e = torch.relu(self.early(x))
                return self.fc(self.late(e).mean((2, 3))), e.mean((2, 3))

        def make():
            torch.manual_seed(0)
            return TwoHeads().eval(), (torch.randn(1, 3, 16, 16),)
    """))
    loaded = load_model(f"{factory}:make")
    model = export_onnx(loaded)
    result = build_stage_directory(model, flops_costs(model), tmp_path / "out", "two", CutOptions(ratios=(0.9,), allow_off_target=True), progress=False)
    part = result.manifest.partitions[0]
    assert len(result.manifest.outputs) == 2
    assert part.head_outputs, "the early output should be produced by the head at 90/10"
    assert result.rows[0].max_abs_err <= 1e-4


def test_a_tampered_stage_file_fails_verification(tmp_path):
    model = tiny_onnx("resnet18-tiny")
    result = build_stage_directory(model, flops_costs(model), tmp_path, "r", CutOptions(ratios=(0.8,), allow_off_target=True), progress=False)
    tail = tmp_path / result.manifest.partitions[0].tail
    tail.write_bytes(tail.read_bytes() + b"\0")
    with pytest.raises(ManifestError, match="bytes"):
        load_verified_manifest(tmp_path)
