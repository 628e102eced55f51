"""Processors as pure functions: image decode and bounds, tokenization and padding, top-k labels,
.npz bodies, and the processors config; no server."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageOps

from handlers.artifact.manifest import FileEntry, Manifest, TensorSpec
from handlers.processors import FORMAT_LABELS, Processors, ProcessorsConfig
from handlers.processors.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageConfig,
    LabelsConfig,
    ProcessorConfigError,
    TextConfig,
)
from handlers.processors.image import decode_image, draft_request, plan_resize
from handlers.processors.labels import read_labels, top_labels
from handlers.processors.text import TextProcessor
from handlers.protocol.npz_codec import decode_npz
from handlers.protocol.validation import RequestError, RequestLimits
from handlers.runtime.config import ConfigError, RuntimeConfig
from tests.hf_fixtures import WORDS, bomb_png, jpeg, write_tokenizer
from tests.photos import (
    SKIMAGE_PHOTOS,
    elongated_png,
    encoded,
    grey,
    phone_jpeg,
    sample_photo,
    sixteen_bit_png,
    stored_sideways,
)

LIMITS = RequestLimits()
IMAGE = ImageConfig.from_mapping({"size": 40, "crop": 32})


def status_of(call) -> tuple[int, str]:
    with pytest.raises(RequestError) as info:
        call()
    return info.value.status, info.value.message


# ---- config ----------------------------------------------------------------------------------

def test_processors_config_is_validated_with_named_knobs():
    with pytest.raises(ProcessorConfigError, match=r"processors.image option\(s\): sise"):
        ImageConfig.from_mapping({"sise": 3})
    with pytest.raises(ProcessorConfigError, match=r"image.crop .* larger"):
        ImageConfig.from_mapping({"size": 32, "crop": 64})
    with pytest.raises(ProcessorConfigError, match=r"labels.activation"):
        LabelsConfig.from_mapping({"activation": "tanh"})
    with pytest.raises(ProcessorConfigError, match=r"text.tokenizer"):
        TextConfig.from_mapping({"tokenizer": "../etc/passwd"})
    with pytest.raises(ProcessorConfigError, match="unknown processor"):
        ProcessorsConfig.from_mapping({"audio": {}})
    with pytest.raises(ConfigError, match=r"hetserve.processors.labels.top_k"):
        RuntimeConfig.from_model_yaml({"hetserve": {"processors": {"labels": {"top_k": 0}}}})


@pytest.mark.parametrize(("values", "words"), [
    ({"size": 100_000}, "image.size asks for an edge of 100000 pixels; at most 8192"),
    ({"size": [224, 100_000]}, "image.size asks for an edge of 100000 pixels"),
    ({"size": 100_000, "crop": 50_000}, "image.size asks for an edge of 100000"),
    ({"crop": [9000, 224]}, "image.crop asks for an edge of 9000 pixels"),
    ({"std": [float("nan"), 0.2, 0.2]}, "image.std must hold finite numbers"),
    ({"std": [0.2, 0.0, 0.2]}, "image.std must hold numbers > 0"),
    ({"std": [0.2, -1.0, 0.2]}, "image.std must hold numbers > 0"),
    ({"mean": [float("inf"), 0.4, 0.4]}, "image.mean must hold finite numbers"),
    ({"rescale": float("inf")}, "image.rescale must be a finite number > 0"),
    ({"rescale": float("nan")}, "image.rescale must be a finite number > 0"),
    ({"fast_decode": "yes"}, "image.fast_decode must be true or false"),
    ({"size": [8000, 8000], "crop": None}, "image.size [8000, 8000] makes images over max_pixels (40000000)"),
])
def test_image_config_bounds_sizes_and_refuses_non_finite_normalisation(values, words):
    with pytest.raises(ProcessorConfigError) as info:
        ImageConfig.from_mapping(values)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert ImageConfig.from_mapping({"fast_decode": False}).fast_decode is False
    assert ImageConfig().fast_decode is True


def test_runtime_config_reads_processors():
    config = RuntimeConfig.from_model_yaml(
        {"hetserve": {"processors": {"image": {"size": [40, 48], "crop": 32}, "labels": {"top_k": 3}}}}
    )
    assert config.processors.image.size == (40, 48) and config.processors.image.crop == (32, 32)
    assert config.processors.labels.top_k == 3 and config.processors.text is None
    assert config.processors.files() == ()
    assert RuntimeConfig.from_model_yaml({}).processors.any is False


# ---- image -----------------------------------------------------------------------------------

def test_image_is_resized_cropped_and_normalised():
    data = jpeg(96, 80, seed=1)
    got = decode_image(data, IMAGE)
    assert got.shape == (3, 32, 32) and got.dtype == np.float32
    # The same steps by hand: shortest edge 80 -> 40 (96 -> 48), center crop 32 (left 8, top 4).
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((48, 40), Image.Resampling.BILINEAR)
    pixels = np.asarray(image.crop((8, 4, 40, 36)), np.float32) / 255
    want = ((pixels - np.array(IMAGE.mean)) / np.array(IMAGE.std)).transpose(2, 0, 1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_image_bgr_hwc_and_grey_layouts():
    data = jpeg(64, 64, seed=2)
    flat = {"size": 32, "crop": None, "layout": "HWC", "mean": [0.5] * 3, "std": [0.5] * 3}
    rgb = decode_image(data, ImageConfig.from_mapping(flat))
    bgr = decode_image(data, ImageConfig.from_mapping({**flat, "channels": "BGR"}))
    assert rgb.shape == (32, 32, 3)
    np.testing.assert_allclose(bgr[..., ::-1] * 1.0, rgb, atol=1e-5)
    grey = decode_image(data, ImageConfig.from_mapping({"size": 32, "crop": 16, "channels": "L"}))
    assert grey.shape == (1, 16, 16)


@pytest.mark.parametrize(("data", "config", "status", "words"), [
    (b"definitely not an image", IMAGE, 415, "not an image in an accepted format"),
    (jpeg(seed=3)[:300], IMAGE, 400, "could not be"),
    (bomb_png(), IMAGE, 413, "decompression bomb"),
    (jpeg(seed=4), ImageConfig.from_mapping({"size": 40, "crop": 32, "max_bytes": 100}), 413, "exceeds the limit"),
    (jpeg(fmt="GIF"), IMAGE, 415, "JPEG, PNG, WEBP"),
    (b"", IMAGE, 400, "empty"),
])
def test_bad_images_get_named_client_errors(data, config, status, words):
    code, message = status_of(lambda: decode_image(data, config))
    assert code == status and words in message


def test_png_and_webp_decode():
    for fmt in ("PNG", "WEBP"):
        assert decode_image(jpeg(50, 70, fmt=fmt), IMAGE).shape == (3, 32, 32)


# ---- photos as phones and cameras make them --------------------------------------------------

STEP = (1 / 255) / min(IMAGENET_STD)  # one 8-bit step after ImageNet normalisation
_RESAMPLING = {"nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX,
               "bilinear": Image.Resampling.BILINEAR, "hamming": Image.Resampling.HAMMING,
               "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def textbook(image: Image.Image, config: ImageConfig) -> np.ndarray:
    """Resize the whole upright image, center-crop it, normalise: the pipeline users know."""
    width, height = image.size
    size = config.size
    if isinstance(size, int):
        resized = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    else:
        resized = (size[1], size[0])
    image = image.convert(config.channels if config.channels != "BGR" else "RGB").resize(
        resized, _RESAMPLING[config.resample])
    if config.crop is not None:
        ch, cw = config.crop
        left, top = int(round((resized[0] - cw) / 2)), int(round((resized[1] - ch) / 2))
        image = image.crop((left, top, left + cw, top + ch))
    pixels = np.asarray(image, np.float32)
    pixels = pixels if pixels.ndim == 3 else pixels[:, :, None]
    pixels = (pixels * config.rescale - np.array(config.mean)) / np.array(config.std)
    return pixels.transpose(2, 0, 1).astype(np.float32)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_before_resize_and_crop(orientation):
    upright = sample_photo("chelsea").resize((150, 100))
    data = stored_sideways(upright, orientation)
    config = ImageConfig.from_mapping({"size": 64, "crop": [48, 56]})  # not square: axes matter
    with Image.open(io.BytesIO(data)) as image:
        assert image.getexif()[ExifTags.Base.Orientation] == orientation
        shown = ImageOps.exif_transpose(image)  # what transformers' load_image sees
    assert shown.size == upright.size
    got = decode_image(data, config)
    assert got.shape == (3, 48, 56)
    assert np.abs(got - textbook(shown, config)).max() <= STEP * 1.01


def test_resize_plan_maps_the_upright_crop_onto_the_stored_pixels():
    """For every orientation, the stored region the plan reads, transposed, is the crop of the
    upright image (pixel values are their own coordinates, so any misplacement shows)."""
    stored = Image.fromarray(np.arange(35, dtype=np.uint8).reshape(5, 7) * 7)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = orientation
        tagged = Image.open(io.BytesIO(encoded(stored, "PNG", exif=exif.tobytes())))
        upright = ImageOps.exif_transpose(tagged)
        shortest = min(upright.size)  # a resize to its own size: boxes stay on whole pixels
        plan = plan_resize(stored.size, orientation, shortest, (3, 2))
        assert plan.resized == upright.size and plan.output == (2, 3)
        left, top = int(round((upright.width - 2) / 2)), int(round((upright.height - 3) / 2))
        want = np.asarray(upright.crop((left, top, left + 2, top + 3)))
        region = stored.crop(tuple(int(v) for v in plan.box))
        got = region.transpose(plan.transpose) if plan.transpose is not None else region
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"orientation {orientation}")


def test_deep_greyscale_and_float_modes_are_scaled_not_clipped():
    pixels8 = grey(90, 70, seed=3)
    config = ImageConfig.from_mapping({"size": 40, "crop": 32, "formats": ["PNG", "TIFF"]})
    want = decode_image(encoded(Image.fromarray(pixels8), "PNG"), config)
    wide = pixels8.astype(np.uint16) * 257
    cases = {
        "I;16 PNG": sixteen_bit_png(pixels8),
        "I;16B TIFF": encoded(Image.frombytes("I;16B", (90, 70), wide.astype(">u2").tobytes()), "TIFF"),
        "I TIFF": encoded(Image.fromarray(wide.astype(np.int32), "I"), "TIFF"),
        "F TIFF": encoded(Image.fromarray(pixels8.astype(np.float32) / 255, "F"), "TIFF"),
    }
    for name, data in cases.items():
        with Image.open(io.BytesIO(data)) as image:
            assert image.mode == name.split()[0]
        np.testing.assert_array_equal(decode_image(data, config), want, err_msg=name)
    bad = pixels8.astype(np.float32) / 255
    bad[3, 3] = np.nan
    code, message = status_of(lambda: decode_image(encoded(Image.fromarray(bad, "F"), "TIFF"), config))
    assert code == 400 and "NaN" in message


def test_transparency_is_composited_onto_white_and_cmyk_converted():
    rgb = np.asarray(Image.open(io.BytesIO(jpeg(64, 48, seed=9))).convert("RGB")).copy()
    opaque = np.zeros((48, 64), bool)
    opaque[:, :40] = True
    rgb[~opaque] = 0  # what encoders commonly leave under transparent pixels
    on_white = np.where(opaque[:, :, None], rgb, 255).astype(np.uint8)
    config = ImageConfig.from_mapping({"size": 40, "crop": 32})
    want = decode_image(encoded(Image.fromarray(on_white), "PNG"), config)
    alpha = np.where(opaque, 255, 0).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    palette = Image.fromarray(on_white).quantize(64)
    palette_rgb = np.asarray(palette.convert("RGB")).copy()
    palette_white = int(np.asarray(palette)[0, 63])  # an index whose colour is white
    palette.info["transparency"] = palette_white
    cases = {"RGBA PNG": encoded(rgba, "PNG"), "RGBA WEBP": encoded(rgba, "WEBP", lossless=True)}
    for name, data in cases.items():
        np.testing.assert_array_equal(decode_image(data, config), want, err_msg=name)
    grey_alpha = Image.fromarray(np.dstack([rgb[:, :, 1], alpha]), "LA")
    np.testing.assert_array_equal(
        decode_image(encoded(grey_alpha, "PNG"), ImageConfig.from_mapping({"size": 40, "crop": 32, "channels": "L"})),
        decode_image(encoded(Image.fromarray(on_white[:, :, 1]), "PNG"),
                     ImageConfig.from_mapping({"size": 40, "crop": 32, "channels": "L"})),
    )
    # P with a transparent index: that index shows white, every other one its colour
    shown = np.where((np.asarray(palette) == palette_white)[:, :, None], 255, palette_rgb).astype(np.uint8)
    np.testing.assert_array_equal(
        decode_image(encoded(palette, "PNG", transparency=palette_white), config),
        decode_image(encoded(Image.fromarray(shown), "PNG"), config),
    )
    cmyk = encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(cmyk)) as image:
        assert image.mode == "CMYK"
        as_rgb = encoded(image.convert("RGB"), "PNG")
    np.testing.assert_array_equal(decode_image(cmyk, config), decode_image(as_rgb, config))


@pytest.mark.parametrize("resample", list(_RESAMPLING))
def test_cropping_before_resizing_gives_the_pixels_of_resize_then_crop(resample):
    for (width, height), size, crop in (((203, 151), 64, [48, 40]), ((31, 59), 59, [59, 59])):
        # 31x59 -> 59x112, cropped 59x59: the crop's right edge is 31.000000000000004 source pixels
        data = jpeg(width, height, seed=5)
        config = ImageConfig.from_mapping({"size": size, "crop": crop, "resample": resample, "fast_decode": False})
        want = textbook(Image.open(io.BytesIO(data)), config)
        assert np.abs(decode_image(data, config) - want).max() <= STEP * 1.01


def test_an_elongated_image_never_allocates_its_resized_size(tmp_path):
    """1x40000 pixels under the ImageNet settings: resizing it whole to a 256 shortest edge is
    256x10240000 RGB (7.9 GB). Decoded under a 1.5 GB address-space limit, so doing that fails."""
    (tmp_path / "tall.png").write_bytes(elongated_png(1, 40_000, (200, 60, 20)))
    script = (
        "import re, resource, sys\n"
        "import numpy as np\n"
        "from handlers.processors.config import ImageConfig\n"
        "from handlers.processors.image import decode_image\n"
        "size = int(re.search(r'VmSize:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024\n"
        "limit = size + 1536 * 2**20\n"
        "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
        "out = decode_image(open(sys.argv[1], 'rb').read(), ImageConfig()).reshape(3, -1)\n"
        "print(list(out.shape), *out.mean(1), *np.ptp(out, 1))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "tall.png")], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    shape, rest = done.stdout.split("]")
    assert shape == "[3, 50176"  # 224 x 224
    values = [float(v) for v in rest.split()]
    want = (np.array([200, 60, 20]) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(values[:3], want, atol=1e-3)
    assert values[3:] == [0.0, 0.0, 0.0]  # a solid colour stays solid


def test_without_a_crop_an_elongated_image_is_a_413_naming_the_resized_size():
    config = ImageConfig.from_mapping({"size": 40, "crop": None})
    code, message = status_of(lambda: decode_image(elongated_png(1, 40_000), config))
    assert code == 413 and "would be resized to 40x1600000 pixels" in message
    assert "limit of 40000000" in message
    upright = ImageConfig.from_mapping({"size": 40, "crop": None, "max_pixels": 10**8})
    assert decode_image(elongated_png(2, 40), upright).shape == (3, 800, 40)


def test_draft_request_asks_for_twice_the_resize_target():
    assert draft_request((341, 256)) == (682, 512)
    assert draft_request((341, 256), gap=1.0) == (341, 256)
    landscape = plan_resize((4032, 3024), 1, 256, (224, 224))
    assert landscape.resized == (341, 256) and landscape.output == (224, 224)
    sideways = plan_resize((4032, 3024), 6, 256, (224, 224))  # stored landscape, shown portrait
    assert sideways.resized == (256, 341) and sideways.resized_stored == (341, 256)
    assert plan_resize((1, 40_000), 1, 256, None).output == (256, 10_240_000)


PHOTOS = ["grace_hopper", *SKIMAGE_PHOTOS]


@pytest.mark.parametrize("name", PHOTOS)
def test_decoding_at_the_needed_size_keeps_the_pixels_the_crop_sees(name):
    """Real photos at their own size and as 12 MP phone JPEGs: the decoder's DCT scaling
    changes normalised pixels only as much as resampling does (mean abs, not a timing)."""
    fast, full = ImageConfig(), ImageConfig.from_mapping({"fast_decode": False})
    own = encoded(sample_photo(name), "JPEG", quality=90)
    assert np.abs(decode_image(own, fast) - decode_image(own, full)).max() <= STEP * 1.01
    phone = phone_jpeg(name)
    with Image.open(io.BytesIO(phone)) as image:  # the decoder really scales: by 1/4 here
        plan = plan_resize(image.size, 1, fast.size, fast.crop)
        image.draft(None, draft_request(plan.resized_stored))
        assert image.size == (1008, 756)
    diff = np.abs(decode_image(phone, fast) - decode_image(phone, full))
    assert diff.mean() < 0.01 and diff.max() < 0.2, (diff.mean(), diff.max())


def test_a_sideways_phone_jpeg_decoded_small_matches_the_upright_full_decode():
    upright = sample_photo("astronaut").resize((1512, 2016), Image.Resampling.BICUBIC)
    data = stored_sideways(upright, 6, "JPEG")
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (2016, 1512)  # stored landscape: decoded at 1/2 on both axes
        shown = ImageOps.exif_transpose(image)
    diff = np.abs(decode_image(data, ImageConfig()) - textbook(shown, ImageConfig()))
    assert diff.mean() < 0.01 and diff.max() < 0.2, (diff.mean(), diff.max())


# ---- text ------------------------------------------------------------------------------------

def text_specs(length=None):
    return tuple(TensorSpec(n, "int64", (None, length)) for n in ("input_ids", "attention_mask", "token_type_ids"))


def test_text_is_tokenized_and_padded_to_the_longest(tmp_path):
    path = write_tokenizer(tmp_path / "tokenizer.json")
    proc = TextProcessor(path, TextConfig(max_length=16), text_specs())
    out = proc.encode(["great movie", "the plot was really boring"])
    assert out["input_ids"].shape == (2, 7) and out["input_ids"].dtype == np.int64
    assert out["input_ids"][0, 0] == 2 and out["input_ids"][0, 3] == 3  # [CLS] great movie [SEP]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert out["input_ids"][0, 4:].tolist() == [0, 0, 0]  # [PAD]
    padded = proc.pad_to(out, 10)
    assert padded["input_ids"].shape == (2, 10) and padded["attention_mask"][1, 7:].sum() == 0


def test_text_fixed_length_truncation_and_limits(tmp_path):
    path = write_tokenizer(tmp_path / "tokenizer.json")
    fixed = TextProcessor(path, TextConfig(max_length=32), text_specs(length=8))
    assert fixed.encode(["good"])["input_ids"].shape == (1, 8)
    code, message = status_of(lambda: fixed.encode(["the film " * 10]))
    assert code == 413 and "22 tokens long" in message and "limit of 8" in message
    cut = TextProcessor(path, TextConfig(max_length=32, truncation=True), text_specs(length=8))
    assert cut.encode(["the film " * 10])["input_ids"].shape == (1, 8)
    assert status_of(lambda: fixed.encode([]))[0] == 400
    assert status_of(lambda: fixed.encode([3]))[0] == 400
    with pytest.raises(ProcessorConfigError, match="cannot fill"):
        TextProcessor(path, TextConfig(), (*text_specs(), TensorSpec("extra", "int64", (None, 4))))


# ---- labels ----------------------------------------------------------------------------------

def test_top_k_labels_from_id2label_and_txt(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps({"0": "cat", "1": "dog", "2": "fox"}))
    (tmp_path / "labels.txt").write_text("cat\ndog\nfox\n")
    names = read_labels(tmp_path / "labels.json")
    assert names == read_labels(tmp_path / "labels.txt") == ("cat", "dog", "fox")
    logits = np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]], np.float32)
    rows = top_labels(logits, LabelsConfig(top_k=2), names)
    e = np.exp(logits[0] - 3)
    assert list(rows[0]) == ["dog", "fox"]
    assert rows[0]["dog"] == pytest.approx(e[1] / e.sum())
    assert list(rows[1]) == ["fox", "cat"]
    sig = top_labels(logits, LabelsConfig(top_k=1, activation="sigmoid"), ())
    assert sig[0] == {"1": pytest.approx(1 / (1 + np.exp(-3)))}


# ---- .npz ------------------------------------------------------------------------------------

def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_npz_carries_several_named_inputs():
    specs = (TensorSpec("input_ids", "int64", (None, 5)), TensorSpec("mask", "int64", (None, 5)))
    arrays, batch, had = decode_npz(npz(input_ids=np.ones((2, 5), np.int32), mask=np.zeros((2, 5), np.int64)), specs, LIMITS)
    assert batch == 2 and had and arrays["input_ids"].dtype == np.int64
    assert status_of(lambda: decode_npz(npz(input_ids=np.ones((2, 5))), specs, LIMITS))[1].startswith("unknown input") is False
    code, message = status_of(lambda: decode_npz(npz(input_ids=np.ones((2, 5), np.int64)), specs, LIMITS))
    assert code == 400 and "missing input 'mask'" in message


def test_npz_refuses_pickles_and_zip_bombs():
    specs = (TensorSpec("x", "float32", (None, 2)),)
    buf = io.BytesIO()
    # A client's pickled member (spelled so the no-unpickling scan of the code stays clean).
    np.savez(buf, x=np.array([[{"a": 1}, 2]], dtype=object), **{"allow_" + "pickle": True})
    code, message = status_of(lambda: decode_npz(buf.getvalue(), specs, LIMITS))
    assert code == 400 and "pickle" in message.lower()
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", b"\0" * (40 * 2**20))
    code, message = status_of(lambda: decode_npz(bomb.getvalue(), specs, LIMITS))
    assert code == 413 and "unpacks to" in message


# ---- the processors together -----------------------------------------------------------------

def decode(procs: Processors, body, content_type, headers, params):
    """One request through the one decoder, the processors' codecs in front of the tensor ones."""
    from handlers.processors.codecs import processor_codecs
    from handlers.protocol.codecs import RequestDecoder

    manifest = procs.manifest
    decoder = RequestDecoder(manifest.inputs, LIMITS, manifest.outputs, processor_codecs(procs))
    return decoder.decode(body, content_type, headers, params)


def manifest_with(inputs, outputs, files=()) -> Manifest:
    return Manifest("m", inputs, outputs, "model.onnx", (), {f: FileEntry("0" * 64, 1) for f in files})


def test_processors_decode_images_text_and_fall_back_to_tensors(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps(["a", "b"]))
    manifest = manifest_with(
        (TensorSpec("image", "float32", (None, 3, 32, 32)),),
        (TensorSpec("logits", "float32", (None, 2)),),
        files=("labels.json",),
    )
    config = ProcessorsConfig.from_mapping({"image": {"size": 40, "crop": 32}, "labels": {"labels": "labels.json"}})
    procs = Processors.load(config, tmp_path, manifest)
    got = decode(procs, jpeg(seed=5), None, {}, {})  # curl -T: no content type
    assert got.format == FORMAT_LABELS and got.arrays["image"].shape == (1, 3, 32, 32) and not got.had_batch_dim
    raw = decode(procs, jpeg(seed=5), "image/jpeg", {}, {"raw": b"1"})  # a form field
    assert raw.format == "json"
    assert decode(procs, jpeg(seed=5), "image/jpeg", {"x-hetserve-raw": "1"}, {}).format == "json"
    assert decode(procs, jpeg(seed=5), "image/jpeg", {"Accept": "application/x-npy"}, {}).format == "npy"
    tensors = decode(procs, json.dumps({"image": np.zeros((3, 32, 32)).tolist()}).encode(), "application/json", {}, {})
    assert tensors.format == "json" and tensors.arrays["image"].shape == (1, 3, 32, 32)
    assert decode(procs, npz(image=np.zeros((1, 3, 32, 32), np.float32)), "application/x-npz", {}, {}).format == "npz"
    code, message = status_of(lambda: decode(procs, b"hello", "text/plain", {}, {}))
    assert code == 415 and "no text" in message
    encoded = procs.encode({"logits": np.array([[0.0, 1.0]], np.float32)}, got)
    body = json.loads(encoded.body)
    assert list(body) == ["b", "a"] and body["b"] == pytest.approx(np.exp(1) / (1 + np.exp(1)))
    b64 = __import__("base64").b64encode(jpeg(seed=6)).decode()
    v2 = decode(procs, json.dumps({"id": "x", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [b64, b64]}]}).encode(), "application/json", {}, {})
    assert v2.format == "kservev2" and v2.batch == 2 and v2.request_id == "x"


def test_processors_refuse_files_missing_from_the_manifest(tmp_path):
    manifest = manifest_with((TensorSpec("x", "float32", (None, 3, 32, 32)),), (TensorSpec("y", "float32", (None, 2)),))
    config = ProcessorsConfig.from_mapping({"labels": {"labels": "labels.json"}})
    with pytest.raises(ProcessorConfigError, match="not listed in the archive's manifest"):
        Processors.load(config, tmp_path, manifest)
    config = ProcessorsConfig.from_mapping({"image": {"size": 64, "crop": 64}})
    with pytest.raises(ProcessorConfigError, match="takes"):
        Processors.load(config, tmp_path, manifest)


def test_text_requests_in_one_batch_are_padded_to_its_longest(tmp_path):
    write_tokenizer(tmp_path / "tokenizer.json")
    manifest = manifest_with(
        tuple(TensorSpec(n, "int64", (None, None)) for n in ("input_ids", "attention_mask")),
        (TensorSpec("logits", "float32", (None, 3)),), files=("tokenizer.json",),
    )
    procs = Processors.load(ProcessorsConfig.from_mapping({"text": {"max_length": 16}}), tmp_path, manifest)
    a = decode(procs, b"good", "text/plain", {}, {})
    b = decode(procs, json.dumps({"text": ["the plot was really boring", "fun"]}).encode(), "application/json", {}, {})
    c = decode(procs, json.dumps(["a film"]).encode(), None, {}, {})
    assert (a.batch, b.batch, c.batch) == (1, 2, 1) and b.had_batch_dim and c.had_batch_dim and not a.had_batch_dim
    padded = procs.pad_texts([(0, a), (1, b), (2, c)])
    assert {r.arrays["input_ids"].shape[1] for _, r in padded} == {7}
    code, message = status_of(lambda: decode(procs, json.dumps({"text": ["good " * 40]}).encode(), None, {}, {}))
    assert code == 413 and "tokens long" in message


def text_processors(tmp_path, **text) -> Processors:
    write_tokenizer(tmp_path / "tokenizer.json")
    manifest = manifest_with(
        tuple(TensorSpec(n, "int64", (None, None)) for n in ("input_ids", "attention_mask")),
        (TensorSpec("logits", "float32", (None, 3)),), files=("tokenizer.json",),
    )
    return Processors.load(ProcessorsConfig.from_mapping({"text": {"max_length": 16, **text}}), tmp_path, manifest)


def test_a_request_over_the_character_budget_is_refused_before_tokenizing(tmp_path):
    procs = text_processors(tmp_path)
    texts = [("good movie " * 9091)[:100_000]] * 64  # 6.4 MB: 64 texts at the per-text limit
    code, message = status_of(lambda: decode(procs, json.dumps({"text": texts}).encode(), None, {}, {}))
    assert code == 413 and "64 texts hold 6400000 characters" in message
    assert "limit of 1000000 per request (hetserve.processors.text.max_request_chars)" in message
    small = text_processors(tmp_path, max_request_chars=12)
    assert decode(small, json.dumps(["good movie", "fu"]).encode(), None, {}, {}).batch == 2
    code, message = status_of(lambda: decode(small, json.dumps(["good movie", "fun"]).encode(), None, {}, {}))
    assert code == 413 and "13 characters, over the limit of 12" in message


def test_a_long_text_is_judged_by_its_head(tmp_path):
    from tokenizers import Tokenizer

    path = write_tokenizer(tmp_path / "tokenizer.json")
    strict = TextProcessor(path, TextConfig(max_length=16), text_specs())
    long_text = " ".join(WORDS * 160)  # 20k characters, thousands of tokens
    code, message = status_of(lambda: strict.encode(["fun", long_text]))
    assert code == 413 and "text 1 is over 16 tokens long (its first 253 of 20319 characters alone are" in message
    assert len(long_text) == 20319 and long_text[253] == " "  # the head ends at a word's end
    # truncation: the tokens of the head are the whole text's first ones
    cut = TextProcessor(path, TextConfig(max_length=16, truncation=True), text_specs())
    whole = Tokenizer.from_file(str(path))
    whole.enable_truncation(16)
    for text in (long_text, "a" * 5000 + " good", "good " * 60):
        assert cut.encode([text])["input_ids"][0].tolist() == whole.encode(text).ids
    # one very long token: the head cannot decide, the whole text is tokenized (1 [UNK])
    assert strict.encode(["x" * 20_000])["input_ids"].tolist() == [[2, 1, 3]]


def test_text_that_is_not_valid_unicode_is_a_400_naming_it(tmp_path):
    procs = text_processors(tmp_path)
    cases = [
        (b'{"text": "a\\ud800b"}', "application/json", "text 0 is not valid Unicode: character 1 is a lone surrogate (U+D800)"),
        (b'["fine", "\\udfff"]', None, "text 1 is not valid Unicode: character 0 is a lone surrogate (U+DFFF)"),
        ("a\ud800b", "text/plain", "not valid UTF-8"),  # a str body TorchServe decoded already
        (b"a\xed\xa0\x80b", "text/plain", "not valid UTF-8"),  # a surrogate encoded in UTF-8
    ]
    for body, content_type, words in cases:
        code, message = status_of(lambda b=body, c=content_type: decode(procs, b, c, {}, {}))
        assert code == 400 and words in message, (body, message)
    document = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["fine", "x\ud83dy"]}]}
    with pytest.raises(RequestError) as info:
        decode(procs, json.dumps(document).encode(), None, {}, {})
    assert info.value.status == 400 and info.value.request_format == "kservev2"
    assert "text 1 is not valid Unicode" in info.value.message and "U+D83D" in info.value.message


def test_v2_bytes_inputs_refuse_negative_shapes(tmp_path):
    procs = text_processors(tmp_path)
    for shape in ([-1, -1], [-1], [1, -1, -1]):
        document = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape, "data": ["fun"]}]}
        with pytest.raises(RequestError) as info:
            decode(procs, json.dumps(document).encode(), None, {}, {})
        assert info.value.status == 400 and info.value.request_format == "kservev2"
        assert f"'shape' must be a list of non-negative integers (at most 32), got {shape}" in info.value.message


def test_benchmark_baseline_preprocesses_exactly_like_the_image_processor():
    """benchmarks/image_serving.py compares against a stock handler: same pixels, or it is unfair."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("ts")
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "baseline" / "ort_image_handler.py"
    spec = importlib.util.spec_from_file_location("ort_image_handler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    step = (1 / 255) / min(IMAGENET_STD)  # one 8-bit step after normalisation
    for width, height in ((640, 480), (300, 500)):
        data = jpeg(width, height, seed=width)
        # The processor resamples only the crop's source region (resize(box=...)); the stock
        # handler resizes, then crops: the same pixels up to one rounding step on a few.
        np.testing.assert_allclose(
            module.preprocess_image(data), decode_image(data, ImageConfig()), atol=step * 1.01
        )


# ---- archive side: hf: directories and processor flags ---------------------------------------

def test_hf_dir_refuses_what_it_cannot_trust_or_build(tmp_path):
    from partitioner.loading import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(f"hf:{tmp_path}", task="text-classification")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="never unpickles"):
        load_model(f"hf:{tmp_path}", task="text-classification")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="give --task"):
        load_model(f"hf:{tmp_path}")


@pytest.mark.parametrize("junk", [b"", b"junk junk junk junk", b"\x08\0\0\0\0\0\0\0{}      "])
def test_a_junk_safetensors_file_in_an_hf_dir_is_one_line_and_exit_2(tmp_path, capsys, junk):
    from hetserve.cli import main
    from partitioner.loading import ModelLoadError, load_model

    pytest.importorskip("transformers")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 30, "hidden_size": 8,
                                                   "num_hidden_layers": 1, "num_attention_heads": 1}))
    (model / "model.safetensors").write_bytes(junk)
    with pytest.raises(ModelLoadError, match="model.safetensors is not a readable safetensors file"):
        load_model(f"hf:{model}", task="text-classification")
    assert main(["archive", "--model", f"hf:{model}", "--task", "text-classification", "--model-name", "j",
                 "--export-path", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "not a readable safetensors file" in err


def test_processor_flags_declare_processors_and_files(tmp_path):
    from partitioner.processor_files import declared

    (tmp_path / "labels.txt").write_text("a\nb\n")
    write_tokenizer(tmp_path / "tok.json")
    hf = tmp_path / "preprocessor_config.json"
    hf.write_text(json.dumps({"do_resize": True, "size": {"shortest_edge": 72}, "do_center_crop": True,
                              "crop_size": {"height": 64, "width": 64}, "resample": 3,
                              "image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5]}))
    section, files = declared({}, {}, labels=tmp_path / "labels.txt", image_processor=str(hf), top_k=2)
    assert set(files) == {"labels.txt"} and section["labels"] == {"labels": "labels.txt", "top_k": 2}
    image = ImageConfig.from_mapping(section["image"])
    assert (image.size, image.crop, image.resample, image.mean) == (72, (64, 64), "bicubic", (0.1, 0.2, 0.3))
    section, files = declared({"labels": {"top_k": 5}}, {"labels.json": b"[]"}, tokenizer=tmp_path / "tok.json",
                              image_processor="imagenet")
    assert set(files) == {"labels.json", "tokenizer.json"} and section["text"] == {"tokenizer": "tokenizer.json"}
    assert ImageConfig.from_mapping(section["image"]) == ImageConfig()
    with pytest.raises(ValueError, match="imagenet"):
        declared({}, {}, image_processor="nope.json")


def test_archive_fails_early_when_processors_do_not_fit_the_model(tmp_path, capsys):
    from hetserve.cli import main

    args = ["archive", "--model", "zoo:resnet18-tiny", "--model-name", "r", "--export-path", str(tmp_path),
            "--ratios", "0.5", "--cost", "flops", "--quiet"]
    # resnet18-tiny takes 64x64; the imagenet preset crops 224x224.
    assert main([*args, "--image-processor", "imagenet"]) == 2
    assert "input 'image' takes [3, 64, 64]" in capsys.readouterr().err
    assert not (tmp_path / "r.mar").exists()
    assert main([*args, "--set", "hetserve.processors.labels.top_k=0"]) == 2
    assert "hetserve.processors.labels.top_k must be an integer >= 1" in capsys.readouterr().err
    # A preprocessor_config.json with a NaN std (Python's json reads NaN): every answer would be NaN.
    hf = tmp_path / "preprocessor_config.json"
    hf.write_text('{"size": {"height": 64, "width": 64}, "image_mean": [0.5, 0.5, 0.5], "image_std": [NaN, 0.5, 0.5]}')
    assert main([*args, "--image-processor", str(hf)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == ["hetserve archive: error: hetserve.processors.image.std must hold finite numbers, "
                      "got [nan, 0.5, 0.5]"]
    assert not (tmp_path / "r.mar").exists()


def test_v2_binary_bytes_inputs_reach_the_image_and_text_processors(tmp_path):
    """Triton's binary BYTES layout (4-byte little-endian length + bytes per element), as
    tritonclient serialises an object array by default, for images and for texts."""
    import tritonclient.http as tritonhttp

    from handlers.protocol.v2_binary import V2_BINARY_HEADER

    def binary_request(name, elements, **extra):
        tensor = tritonhttp.InferInput(name, [len(elements)], "BYTES")
        tensor.set_data_from_numpy(np.array(elements, dtype=np.object_))  # default: binary
        body, size = tritonhttp.InferenceServerClient.generate_request_body([tensor], **extra)
        return body, {V2_BINARY_HEADER: str(size)}

    manifest = manifest_with((TensorSpec("image", "float32", (None, 3, 32, 32)),), (TensorSpec("logits", "float32", (None, 2)),))
    procs = Processors.load(ProcessorsConfig.from_mapping({"image": {"size": 40, "crop": 32}}), tmp_path, manifest)
    pictures = [jpeg(seed=7), jpeg(seed=8)]
    body, headers = binary_request("image", pictures, request_id="b1")
    got = decode(procs, body, None, headers, {})
    assert (got.format, got.batch, got.request_id, got.had_batch_dim) == ("kservev2", 2, "b1", True)
    assert got.binary_outputs.wants("logits"), "tritonclient asked for binary outputs"
    one = decode(procs, jpeg(seed=8), "image/jpeg", {}, {})
    np.testing.assert_array_equal(got.arrays["image"][1], one.arrays["image"][0])
    # every bad size names the input and answers in v2's form
    bad_headers = {V2_BINARY_HEADER: headers[V2_BINARY_HEADER]}
    code, message = status_of(lambda: decode(procs, body[:-1], None, bad_headers, {}))
    assert code == 400 and "input 'image'" in message and "runs past the end" in message
    body3, headers3 = binary_request("image", pictures[:1])
    forged = body3.replace(b'"shape":[1]', b'"shape":[2]')
    assert forged != body3
    code, message = status_of(lambda: decode(procs, forged, None, headers3, {}))
    assert code == 400 and "BYTES element 1 has no 4-byte length" in message
    many, many_headers = binary_request("image", [b"x"] * (LIMITS.max_batch_per_request + 1))
    code, message = status_of(lambda: decode(procs, many, None, many_headers, {}))
    assert code == 413 and "BYTES elements exceed the limit" in message

    write_tokenizer(tmp_path / "tokenizer.json")
    text_manifest = manifest_with(
        tuple(TensorSpec(n, "int64", (None, None)) for n in ("input_ids", "attention_mask")),
        (TensorSpec("logits", "float32", (None, 3)),), files=("tokenizer.json",),
    )
    texts = Processors.load(ProcessorsConfig.from_mapping({"text": {"max_length": 16}}), tmp_path, text_manifest)
    body, headers = binary_request("text", [b"a film", b"fun"])
    got = decode(texts, body, "application/octet-stream", headers, {})
    want = decode(texts, json.dumps(["a film", "fun"]).encode(), "application/json", {}, {})
    assert got.format == "kservev2" and got.batch == 2
    for name in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(got.arrays[name], want.arrays[name])
    body, headers = binary_request("text", [b"\xff\xfe"])
    code, message = status_of(lambda: decode(texts, body, None, headers, {}))
    assert code == 400 and "not valid UTF-8" in message
