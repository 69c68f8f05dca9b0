"""Real models that pip installs with their weights inside the wheel (no download at run time).

PP-OCRv4 comes from the ``rapidocr-onnxruntime`` wheel. That package imports OpenCV when
imported, so its folder is found through importlib without importing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from graphcomp.errors import ModelLoadError

PPOCR_FILES = {
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
}

# Input shapes the models are used at: text detection on a 640x640 page, recognition of one
# 48x320 text line, direction classification of one 48x192 text line.
PPOCR_SHAPES = {
    "det": {"x": (1, 3, 640, 640)},
    "rec": {"x": (1, 3, 48, 320)},
    "cls": {"x": (1, 3, 48, 192)},
}


def package_dir(package: str) -> Path:
    """Return the folder of an installed package without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"package '{package}' is not installed; install it with "
            f"'pip install --no-deps {package.replace('_', '-')}'"
        )
    return Path(list(spec.submodule_search_locations)[0])


def ppocr_path(name: str) -> Path:
    """Path of the PP-OCRv4 ONNX file ``name`` ('det', 'rec' or 'cls')."""
    if name not in PPOCR_FILES:
        raise ModelLoadError(f"unknown PP-OCR model '{name}'; choose one of {sorted(PPOCR_FILES)}")
    path = package_dir("rapidocr_onnxruntime") / "models" / PPOCR_FILES[name]
    if not path.exists():
        raise ModelLoadError(f"{path}: not found in the installed rapidocr-onnxruntime wheel")
    return path


# --- inputs that look like what the PP-OCR models see ------------------------------------------

# PP-OCR scales pixels to [-1, 1]: (pixel / 255 - 0.5) / 0.5.
_PIXEL_SCALE = 127.5


def render_text_image(lines: list[str], height: int, width: int, font_size: int,
                      seed: int = 0, scatter: bool = False) -> np.ndarray:
    """Draw ``lines`` in dark ink on a light background; return an RGB uint8 [H, W, 3] array.

    With ``scatter`` the lines go to random places and sizes on the page (a document for the
    detector); otherwise one line is drawn left-aligned and vertically centred (a text line
    crop for the recognizer and the direction classifier)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(225, 256, 3)))
    draw = ImageDraw.Draw(image)
    if not scatter:
        font = ImageFont.load_default(size=font_size)
        top = (height - font_size) // 2 - font_size // 8
        draw.text((4, top), lines[0], fill=(20, 20, 20), font=font)
        return np.asarray(image)
    y = int(rng.integers(8, 30))
    for line in lines:
        size = int(rng.integers(font_size // 2, font_size + 1))
        if y + size > height - 8:
            break
        font = ImageFont.load_default(size=size)
        x = int(rng.integers(8, max(9, width // 6)))
        ink = tuple(int(v) for v in rng.integers(0, 60, 3))
        draw.text((x, y), line, fill=ink, font=font)
        y += int(size * rng.uniform(1.4, 2.2))
    return np.asarray(image)


def ppocr_inputs(name: str, count: int = 4, seed: int = 0) -> np.ndarray:
    """``count`` rendered text images in the input layout of PP-OCR model ``name``:
    float32 [count, 3, H, W] in [-1, 1]. Random noise leaves the detector's map near zero
    everywhere, so verification on these images catches errors that random inputs hide.

    For the direction classifier ('cls') every second line (odd indices) is rotated by 180
    degrees, so that both of its classes are covered; ``ppocr_cls_labels`` gives the classes."""
    from graphcomp.models import minilm_sentences

    sentences = minilm_sentences()
    _, _, height, width = PPOCR_SHAPES[name]["x"]
    images = []
    for i in range(count):
        if name == "det":
            picked = [sentences[(i * 7 + k) % len(sentences)] for k in range(24)]
            image = render_text_image(picked, height, width, 34, seed + i, scatter=True)
        else:
            line = sentences[(seed + i) % len(sentences)]
            image = render_text_image([line], height, width, 30, seed + i)
            if name == "cls" and i % 2:
                image = image[::-1, ::-1]
        images.append(image.transpose(2, 0, 1))
    batch = np.stack(images).astype(np.float32)
    return batch / _PIXEL_SCALE - 1.0


def ppocr_cls_labels(count: int = 4) -> np.ndarray:
    """Classes of ``ppocr_inputs('cls', count)``: 0 for upright text, 1 for text rotated by 180
    degrees (the classifier's outputs are the probabilities of these two)."""
    return np.arange(count, dtype=np.int64) % 2
