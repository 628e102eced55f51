"""BERT-base and ViT-base from their default configs with random weights (no hub download),
for benchmarks/hf_serving.py: ``--model benchmarks/hf_factories.py:bert``."""

from __future__ import annotations

import torch
import transformers as hf


def bert():
    torch.manual_seed(0)
    model = hf.BertModel(hf.BertConfig()).eval()
    ids = torch.randint(0, 30522, (1, 128), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "attention_mask": torch.ones(1, 128, dtype=torch.long)}


def vit():
    torch.manual_seed(0)
    model = hf.ViTForImageClassification(hf.ViTConfig(num_labels=1000)).eval()
    return model, {"pixel_values": torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))}
