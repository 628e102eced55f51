"""Baseline: TorchServe's stock BaseHandler serving an .onnx through its own ONNX Runtime path,
taking JPEGs with the same Pillow preprocessing hetserve's image processor uses.

BaseHandler opens the ORT session itself when the serialized file ends in ``.onnx``; a user adds
the three short methods below (TorchServe's own image_classifier needs torchvision, which does
not work with the pinned torch). The steps match handlers/processors/image.py with ImageConfig's
defaults: RGB, shortest edge -> 256 (bilinear), center crop 224, /255, ImageNet mean/std, CHW;
tests/test_processors.py checks that both give the same pixels.
"""

import io
import json
import os

import numpy as np
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def preprocess_image(data: bytes, resize: int = 256, crop: int = 224) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    if width <= height:
        size = (resize, max(1, int(resize * height / width)))
    else:
        size = (max(1, int(resize * width / height)), resize)
    image = image.resize(size, Image.Resampling.BILINEAR)
    left = int(round((image.width - crop) / 2.0))
    top = int(round((image.height - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    pixels = np.asarray(image, np.float32) / 255.0
    return ((pixels - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)


class OrtImageHandler(BaseHandler):
    def initialize(self, context):
        super().initialize(context)
        model_dir = context.system_properties.get("model_dir")
        with open(os.path.join(model_dir, "labels.json")) as f:
            self.labels = json.load(f)
        self.input_name = self.model.get_inputs()[0].name

    def preprocess(self, data):
        return np.stack([preprocess_image(bytes(row.get("body") or row.get("data"))) for row in data])

    def inference(self, data, *args, **kwargs):
        return self.model.run(None, {self.input_name: data})[0]

    def postprocess(self, data):
        scores = np.exp(data - data.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
        top = np.argsort(-scores, axis=1)[:, :5]
        return [{self.labels[i]: float(row[i]) for i in picks} for row, picks in zip(scores, top, strict=True)]
