"""Distillation inputs from few examples: :class:`MixedInputs`, convex mixtures of pairs of inputs.

A student distilled on a handful of examples matches the teacher on those examples and little else. Distillation
needs no labels (the teacher gives the targets on whatever the student sees), so its inputs can be blends of
two examples: the teacher's output on a blend is a target like any other, and the blends cover the space between
the examples, where held-out inputs also lie. This is mixup used for "function matching" (Beyer et al., "Knowledge
distillation: A good teacher is patient and consistent", CVPR 2022): the same mixed input goes to teacher and
student. It is for teacher-labelled losses only (``"kd"``, ``"mse"``, ``"cosine"``): a task label does not mix.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

__all__ = ["MixedInputs"]


class MixedInputs(Dataset):
    """Item ``i`` is ``w * x[i] + (1 - w) * x[j]``: example ``i`` of ``inputs`` blended with a partner ``j != i``,
    with ``w`` uniform in [0, 1]; ``j`` and ``w`` are drawn from a generator seeded by ``(seed, i)``, so an item is
    the same in any order and in any DataLoader worker. ``inputs``: a Dataset (or anything with ``__len__`` and
    ``__getitem__``) of at least 2 examples, each a tensor (a 1-tuple of one is unpacked), all of one shape. Give it
    to :func:`~gmcompress.training.finetune` as ``data`` with a teacher-labelled loss (``"kd"``, ``"mse"``,
    ``"cosine"``)."""

    def __init__(self, inputs: Dataset, seed: int = 0) -> None:
        n = len(inputs)  # type: ignore[arg-type]
        if n < 2:
            raise ValueError(f"MixedInputs blends pairs of examples, so it needs at least 2; got {n}")
        if seed < 0:
            raise ValueError(f"MixedInputs(seed={seed}): expected a seed >= 0")
        self.inputs, self.seed, self.n = inputs, seed, n

    def __len__(self) -> int:
        return self.n

    def partner(self, i: int) -> tuple[int, float]:
        """``(j, w)`` of item ``i``."""
        # torch's CPU generator keeps 32 bits of a seed
        generator = torch.Generator().manual_seed((self.seed * 2_654_435_761 + i) % 2**32)
        j = (i + 1 + int(torch.randint(0, self.n - 1, (), generator=generator))) % self.n  # any index but i
        return j, float(torch.rand((), generator=generator))

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(f"item {i} of {self.n}")
        j, w = self.partner(i)
        a, b = self._example(i), self._example(j)
        if a.shape != b.shape:
            raise ValueError(
                f"MixedInputs: examples {i} and {j} have shapes {tuple(a.shape)} and {tuple(b.shape)}; blends need "
                "examples of one shape (crop or pad them first)"
            )
        return w * a + (1 - w) * b

    def _example(self, i: int) -> torch.Tensor:
        item = self.inputs[i]
        if isinstance(item, (tuple, list)) and len(item) == 1:
            item = item[0]
        if not isinstance(item, torch.Tensor) or not item.is_floating_point():
            what = f"a {type(item).__name__} of {len(item)}" if isinstance(item, (tuple, list)) else repr(type(item))
            raise TypeError(
                f"MixedInputs: example {i} is {what}, not a floating-point tensor. It mixes inputs only (a task label "
                "does not mix): give it a Dataset of input tensors and distil with loss='kd', 'mse' or 'cosine'"
            )
        return item
