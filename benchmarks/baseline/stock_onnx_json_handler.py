"""Baseline for JSON bodies: TorchServe's stock BaseHandler serving a ``.onnx`` through its own ONNX Runtime path.

BaseHandler opens the ORT session itself when the serialized file ends in ``.onnx`` (intra-op
threads = logical CPUs). A user bringing an ONNX model overrides the three short methods below:
JSON bodies ``{"input name": nested lists}`` in, ``{"output name": nested lists}`` out.
"""

import json

import numpy as np
from ts.torch_handler.base_handler import BaseHandler


class StockOnnxHandler(BaseHandler):
    def preprocess(self, data):
        rows = [json.loads(row.get("body") or row.get("data")) for row in data]
        self._sizes = [len(next(iter(r.values()))) for r in rows]
        feeds = {}
        for spec in self.model.get_inputs():
            dtype = np.int64 if "int64" in spec.type else np.float32
            feeds[spec.name] = np.concatenate([np.asarray(r[spec.name], dtype=dtype) for r in rows])
        return feeds

    def inference(self, data, *args, **kwargs):
        names = [o.name for o in self.model.get_outputs()]
        return dict(zip(names, self.model.run(None, data), strict=True))

    def postprocess(self, data):
        out, start = [], 0
        for size in self._sizes:
            out.append(json.dumps({k: v[start : start + size].tolist() for k, v in data.items()}))
            start += size
        return out
