"""Baseline (a'): TorchServe's stock BaseHandler serving the same .onnx through its own ONNX Runtime path.

This is the handler a TorchServe user would write for an ONNX model: BaseHandler opens the
InferenceSession itself when the serialized file ends in .onnx (intra-op threads = logical CPUs,
TorchServe 0.12's setup_ort_session; on a GPU worker CUDA then CPU providers); the three methods below only decode raw float32 bodies, run
the session and encode the logits.
"""

import math

import numpy as np
from ts.torch_handler.base_handler import BaseHandler


class OnnxBaseHandler(BaseHandler):
    def preprocess(self, data):
        samples = []
        for row in data:
            flat = np.frombuffer(row.get("body") or row.get("data"), dtype=np.float32)
            side = math.isqrt(flat.size // 3)
            samples.append(flat.reshape(-1, 3, side, side))
        return np.concatenate(samples)

    def inference(self, data, *args, **kwargs):
        return self.model.run(None, {self.model.get_inputs()[0].name: data})[0]

    def postprocess(self, data):
        return [row.tobytes() for row in data]
