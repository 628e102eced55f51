"""Dynamic dims beyond the batch: declarations parse strictly, round-trip through the manifest,
and the runtime check names the inputs that disagree or the bound that is broken."""

from __future__ import annotations

import numpy as np
import pytest

from handlers.artifact.manifest import FileEntry, Manifest, Partition, TensorSpec
from handlers.protocol.dynamic_dims import (
    DimError,
    DynamicDims,
    check_dynamic_dims,
    check_request,
    parse_declarations,
)
from handlers.protocol.validation import RequestError

SEQ = parse_declarations(["input_ids:1=seq", "attention_mask:1=seq"], ["seq=128", "seq<=512"])


def test_declarations_parse_into_axes_sizes_and_bounds():
    assert SEQ.axes == {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
    assert SEQ.sizes == {"seq": 128}
    assert SEQ.bounds == {"seq": (1, 512)}
    assert DynamicDims.from_json(SEQ.to_json()) == SEQ


@pytest.mark.parametrize(
    ("dynamic", "dims", "message"),
    [
        (["input_ids"], [], "INPUT:AXIS=SYMBOL"),
        (["input_ids:0=seq"], [], "dim 0 is the batch"),
        (["input_ids:1=batch"], [], "reserved"),
        (["input_ids:1=seq", "input_ids:1=len"], [], "twice"),
        (["input_ids:1=seq"], ["width=3"], "not a declared dynamic dim"),
        (["input_ids:1=seq"], ["seq>=9", "seq<=4"], "empty"),
        (["input_ids:1=seq"], ["seq=600", "seq<=512"], "outside its bounds"),
        (["input_ids:1=seq"], ["seq~4"], "SYMBOL=SIZE"),
    ],
)
def test_bad_declarations_say_what_is_wrong(dynamic, dims, message):
    with pytest.raises(DimError, match=message):
        parse_declarations(dynamic, dims)


def test_inputs_sharing_a_symbol_must_agree():
    assert check_request(SEQ, {"input_ids": (2, 40), "attention_mask": (2, 40)}) == {"seq": 40}
    with pytest.raises(DimError, match=r"'attention_mask' and 'input_ids' must agree on seq"):
        check_request(SEQ, {"input_ids": (2, 40), "attention_mask": (2, 41)})


def test_sizes_outside_the_bounds_are_refused():
    with pytest.raises(DimError, match="accepts seq from 1 to 512"):
        check_request(SEQ, {"input_ids": (1, 513), "attention_mask": (1, 513)})


def test_the_handler_hook_is_a_400():
    arrays = {"input_ids": np.zeros((1, 4)), "attention_mask": np.zeros((1, 5))}
    with pytest.raises(RequestError) as err:
        check_dynamic_dims(SEQ, arrays)
    assert err.value.status == 400
    check_dynamic_dims(DynamicDims(), arrays)  # nothing declared: nothing to check


def _manifest(ratios_achieved):
    spec = TensorSpec("x", "float32", (None, 4))
    parts = tuple(
        Partition(ratio=r, achieved_ratio=a, method="metis", head=f"h{r}", tail=f"t{r}",
                  cut_tensors=(spec,), cut_bytes_per_sample=16, head_cost=1, tail_cost=1,
                  max_abs_err=0.0)
        for r, a in ratios_achieved
    )
    files = {p: FileEntry("0" * 64, 1) for p in ("model.onnx", *(f for x in parts for f in (x.head, x.tail)))}
    return Manifest("m", (spec,), (spec,), "model.onnx", parts, files, dynamic_dims=SEQ.to_json())


def test_a_ratio_not_archived_serves_the_nearest_achieved_one(caplog):
    manifest = _manifest([(0.75, 0.74), (0.85, 0.86)])
    assert manifest.partition_for(0.85).achieved_ratio == 0.86  # exact request
    with caplog.at_level("INFO"):
        assert manifest.partition_for(0.9).achieved_ratio == 0.86
    assert "nearest" in caplog.text and "0.860" in caplog.text
    assert manifest.partition_for(0.7).achieved_ratio == 0.74


def test_the_manifest_round_trips_dynamic_dims():
    manifest = _manifest([(0.8, 0.8)])
    data = manifest.to_json()
    assert data["dynamic_dims"]["axes"]["input_ids"] == {"1": "seq"}
    again = Manifest.from_json(data)
    assert DynamicDims.from_json(again.dynamic_dims) == SEQ
