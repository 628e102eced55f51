"""Baseline: TorchServe's stock BaseHandler serving a text classifier's .onnx through its own
ONNX Runtime path, tokenizing with the model's own tokenizer.json.

What a TorchServe user writes for a Hugging Face encoder exported to ONNX: BaseHandler opens the
InferenceSession itself when the serialized file ends in ``.onnx`` (intra-op threads = logical
CPUs); preprocess tokenizes the batch with the ``tokenizers`` library, padding every text to the
batch's longest and truncating at 128 tokens; postprocess answers the top-5 labels as
``{"label": score}``, the same answer hetserve's labels processor gives.
"""

import json
import os

import numpy as np
from tokenizers import Tokenizer
from ts.torch_handler.base_handler import BaseHandler

MAX_LENGTH = 128
TOP_K = 5


class OrtTextHandler(BaseHandler):
    def initialize(self, context):
        super().initialize(context)
        model_dir = context.system_properties.get("model_dir")
        self.tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_LENGTH)
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
        with open(os.path.join(model_dir, "labels.json")) as f:
            self.labels = json.load(f)
        self.input_names = [i.name for i in self.model.get_inputs()]

    def preprocess(self, data):
        texts = []
        for row in data:
            body = row.get("body") or row.get("data")
            texts.append(body if isinstance(body, str) else bytes(body).decode("utf-8"))
        encodings = self.tokenizer.encode_batch(texts)
        fields = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        return {name: np.asarray(fields[name], np.int64) for name in self.input_names}

    def inference(self, data, *args, **kwargs):
        return self.model.run(None, data)[0]

    def postprocess(self, data):
        scores = np.exp(data - data.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
        top = np.argsort(-scores, axis=1)[:, :TOP_K]
        return [{self.labels[i]: float(row[i]) for i in picks} for row, picks in zip(scores, top, strict=True)]
