"""A two-branch multimodal classifier: an image CNN and a text transformer joined by concat.

The image branch (two conv + batch norm + ReLU blocks, global average pooling) and the text
branch (token and position embeddings, one transformer encoder layer, mean over tokens) each
give a 32-dim feature vector. The MLP head reads both, concatenated. Pruning must keep the
head's input columns consistent with both branches: image channels map to columns 0..31 and
text features to columns 32..63.

``build()`` returns the module with seeded random weights and example inputs, so it loads as
``examples/multimodal/model.py:build``. It is a test model, not a trained one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 100
SEQ_LEN = 8
WIDTH = 32
HEADS = 4


class ImageBranch(nn.Module):
    """[N, 3, 16, 16] images to [N, 32] features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, WIDTH, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(WIDTH)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(image)))
        x = F.relu(self.bn2(self.conv2(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer: multi-head self-attention, then a GELU FFN."""

    def __init__(self, width: int = WIDTH, heads: int = HEADS, hidden: int = 64) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.norm1 = nn.LayerNorm(width)
        self.ffn_in = nn.Linear(width, hidden)
        self.ffn_out = nn.Linear(hidden, width)
        self.norm2 = nn.LayerNorm(width)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.reshape(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (self._split_heads(layer(x)) for layer in (self.query, self.key, self.value))
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.transpose(1, 2).reshape(batch, length, width)
        x = self.norm1(x + self.out(attended))
        return self.norm2(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class TextBranch(nn.Module):
    """[N, 8] token ids to [N, 32] features (the mean of the encoded tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, WIDTH)
        self.positions = nn.Parameter(torch.randn(SEQ_LEN, WIDTH) * 0.1)
        self.encoder = EncoderLayer()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.tokens(ids) + self.positions).mean(dim=1)


class MultimodalClassifier(nn.Module):
    """Scores 5 classes from an image and a token sequence."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.image = ImageBranch()
        self.text = TextBranch()
        self.head1 = nn.Linear(2 * WIDTH, 32)
        self.head2 = nn.Linear(32, classes)

    def forward(self, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([self.image(image), self.text(ids)], dim=1)
        return self.head2(F.relu(self.head1(joined)))


def build(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Return the classifier in eval mode, with seeded weights and batch-norm statistics,
    and example inputs: images [2, 3, 16, 16] and token ids [2, 8]."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MultimodalClassifier()
    with torch.no_grad():
        for norm in (model.image.bn1, model.image.bn2):
            norm.running_mean.uniform_(-0.5, 0.5, generator=generator)
            norm.running_var.uniform_(0.5, 2.0, generator=generator)
            norm.weight.uniform_(0.5, 1.5, generator=generator)
            norm.bias.uniform_(-0.5, 0.5, generator=generator)
    images = torch.rand(2, 3, 16, 16, generator=generator)
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=generator)
    return model.eval(), (images, ids)
