"""Small Hugging Face models built from configs with random weights (no hub download).

Each factory returns ``(model, example_inputs)`` with the inputs as a dict, as a user brings a
``transformers`` model to ``hetserve archive --model tests/hf_models.py:bert``. Sizes are tiny
so the suite stays inside CI's time budget; the architectures (and their exporter quirks) are
the real ones. Inputs have batch 1 on purpose: hetserve must export from batch >= 2 itself.
"""

from __future__ import annotations

import torch
import transformers as hf

SEQ = 16
IMAGE = 32
VOCAB = 97


def _seeded():
    torch.manual_seed(0)


def _torch_init(model: torch.nn.Module) -> torch.nn.Module:
    """torch's default init instead of HF's: HF's leaves MobileNetV2's logits ~1e-21 and
    EfficientNet's at 0, outputs that prove nothing (hetserve refuses them as evidence)."""
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


def _text_inputs(seq: int = SEQ) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones(1, seq, dtype=torch.long)}


def _pixels(size: int = IMAGE, channels: int = 3) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(1))}


def bert():
    _seeded()
    config = hf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    return hf.BertModel(config).eval(), _text_inputs()


def distilbert():
    _seeded()
    config = hf.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64,
    )
    return hf.DistilBertModel(config).eval(), _text_inputs()


def gpt2():
    _seeded()
    config = hf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, use_cache=False,
        bos_token_id=0, eos_token_id=0,
    )
    return hf.GPT2LMHeadModel(config).eval(), {"input_ids": _text_inputs()["input_ids"]}


def vit():
    _seeded()
    config = hf.ViTConfig(
        image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=7,
    )
    return hf.ViTForImageClassification(config).eval(), _pixels()


def convnext():
    _seeded()
    config = hf.ConvNextConfig(
        hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=5, image_size=IMAGE,
    )
    return hf.ConvNextForImageClassification(config).eval(), _pixels()


def swin():
    _seeded()
    config = hf.SwinConfig(
        image_size=IMAGE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
        window_size=4, num_labels=5,
    )
    return hf.SwinForImageClassification(config).eval(), _pixels()


def mobilenet_v2():
    _seeded()
    config = hf.MobileNetV2Config(image_size=IMAGE, depth_multiplier=0.35, num_labels=5)
    return _torch_init(hf.MobileNetV2ForImageClassification(config)).eval(), _pixels()


def efficientnet():
    _seeded()
    config = hf.EfficientNetConfig(
        image_size=IMAGE, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, num_labels=5,
    )
    return _torch_init(hf.EfficientNetForImageClassification(config)).eval(), _pixels()


def detr():
    _seeded()
    config = hf.DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone=None,
        backbone_config=hf.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
            layer_type="basic", out_features=["stage4"],
        ),
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5,
        num_labels=3,
    )
    model = hf.DetrForObjectDetection(config).eval()
    return _Outputs(model, ("logits", "pred_boxes")), _pixels(64)


def yolos():
    _seeded()
    config = hf.YolosConfig(
        image_size=[IMAGE, IMAGE], patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_detection_tokens=5, num_labels=3,
    )
    model = hf.YolosForObjectDetection(config).eval()
    return _Outputs(model, ("logits", "pred_boxes")), _pixels()


class _Outputs(torch.nn.Module):
    """Keep the two outputs a detector is served for (its ModelOutput also carries internals)."""

    def __init__(self, model: torch.nn.Module, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(pixel_values=pixel_values)
        return {k: out[k] for k in self.keys}


ALL = ("bert", "distilbert", "gpt2", "vit", "convnext", "swin", "mobilenet_v2", "efficientnet", "detr", "yolos")
