"""Real models that pip installs with their weights inside the wheel (no download at run time).

PP-OCRv4 comes from the ``rapidocr-onnxruntime`` wheel. That package imports OpenCV when
imported, so its folder is found through importlib without importing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
