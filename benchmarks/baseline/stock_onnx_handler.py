"""Baseline: TorchServe's stock BaseHandler serving the ``.onnx`` through its own ONNX Runtime path.

BaseHandler opens the session itself when the serialized file ends in ``.onnx`` (on a GPU worker:
CUDA then CPU providers, intra-op threads = logical CPUs, every other option ORT's default). A
user overrides the three methods below, as TorchServe's docs show; nothing else is tuned.
"""

import math

import numpy as np
from ts.torch_handler.base_handler import BaseHandler


class RawTensorOnnxHandler(BaseHandler):
    def preprocess(self, data):
        samples = []
        for row in data:
            flat = np.frombuffer(row.get("body") or row.get("data"), dtype=np.float32)
            side = math.isqrt(flat.size // 3)
            samples.append(flat.reshape(-1, 3, side, side))
        return np.concatenate(samples)

    def inference(self, data, *args, **kwargs):
        name = self.model.get_inputs()[0].name
        return self.model.run(None, {name: data})[0]

    def postprocess(self, data):
        return [row.tobytes() for row in data]
