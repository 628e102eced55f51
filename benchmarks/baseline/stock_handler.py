"""Baseline: TorchServe's stock BaseHandler serving the eager PyTorch model.

Only the body decoding is added (raw float32 bytes -> tensor, logits -> bytes): BaseHandler's own
preprocess expects tensors already. Threads, workers and inference are BaseHandler's defaults.
"""

import math

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler


class RawTensorBaseHandler(BaseHandler):
    def preprocess(self, data):
        samples = []
        for row in data:
            flat = np.frombuffer(row.get("body") or row.get("data"), dtype=np.float32)
            side = math.isqrt(flat.size // 3)
            samples.append(flat.reshape(-1, 3, side, side))
        return torch.from_numpy(np.concatenate(samples))

    def postprocess(self, data):
        return [row.numpy().tobytes() for row in data]
