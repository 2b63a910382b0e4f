"""The GM layer protocol (:class:`GMLayer`) and the shared machinery of the weighted GM layers (:class:`GMModule`).

Every GM layer answers the same questions, so that compression, reports and save/load never need to
know a layer's class: ``from_dense`` (fit a dense layer), ``to_dense`` (export a plain torch layer),
``config``/``from_config`` (rebuild the structure), ``check_equivariance`` and ``macs``. A method that
makes no sense for a layer raises :class:`NotApplicable` saying why. Subclasses register themselves
by class name in :data:`GM_LAYERS` (what ``gmcompress.save`` writes as a layer's kind).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..checks import check_rank
from ..structure import GMFit, Pattern
from .bytecmp import BitSnapshot

BiasMode = bool | str  # True: one bias per output feature (as nn.Linear); "shared": one per output channel


GM_LAYERS: dict[str, type[GMLayer]] = {}
"""Every GM layer class by name: the kinds a saved manifest may name."""


class NotApplicable(NotImplementedError):
    """A protocol method that makes no sense for this layer (the message says why)."""


class GMLayer(nn.Module):
    """The protocol every GM layer follows; see the module docstring."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("abstract", False):
            GM_LAYERS[cls.__name__] = cls

    @classmethod
    def from_dense(cls, module: nn.Module, *args, **kwargs) -> GMLayer:
        """Fit the dense ``module`` by least squares."""
        raise NotApplicable(f"{cls.__name__} has no dense counterpart to fit")

    def to_dense(self) -> nn.Module:
        """A plain torch module computing the same function."""
        raise NotApplicable(f"{type(self).__name__} has no plain torch equivalent")

    def config(self) -> dict:
        """JSON-able constructor arguments: ``type(self).from_config(self.config())`` rebuilds the structure."""
        raise NotApplicable(f"{type(self).__name__} cannot be described by a config")

    @classmethod
    def from_config(cls, config: dict, **factory) -> GMLayer:
        """Rebuild from :meth:`config`; ``factory`` holds ``device`` and ``dtype``."""
        return cls(**config, **factory)

    def check_equivariance(self, x: torch.Tensor | None = None, elements=None, bias: bool = True) -> float:
        """Max over group elements h of ``||f(h . x) - h . f(x)|| / ||f(x)||``, transforming real inputs."""
        raise NotApplicable(f"{type(self).__name__} defines no group action to check")

    def macs(self, inp: torch.Tensor, out: torch.Tensor) -> int:
        """Multiply-accumulates of one call on ``inp`` (giving ``out``) on the path ``forward`` takes."""
        raise NotApplicable(f"{type(self).__name__} does not count its multiply-accumulates")

    def impls(self) -> tuple[str, ...]:
        """The forward paths this layer can take (values of ``self.impl``); () when it has one path only."""
        return ()


class GMModule(GMLayer):
    """Base of the GM layers: kernels ``(r, c_out, c_in, |S|)`` and modulations ``(r, c_out, n_out)``.

    Derived float constants (the block basis) are kept as non-persistent buffers re-derived from
    float64 masters after every ``.to()``/``.half()``/``.float()``, so a round trip through a low
    precision never degrades them; the state_dict holds only learnable parameters.
    """

    abstract = True  # a base, not a layer kind

    def __init__(
        self,
        pattern: Pattern,
        c_out: int,
        c_in: int,
        rank: int,
        modulate: bool,
        support: np.ndarray | None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        rank = check_rank(rank, pattern.n_out, modulate, f"{type(self).__name__}({pattern.name})")
        self.pattern = pattern
        self.c_out, self.c_in, self.rank, self.modulate = c_out, c_in, rank, modulate
        factory = {"device": device, "dtype": dtype}
        n_support = pattern.n_classes if support is None else len(support)
        self.kernels = nn.Parameter(torch.empty(rank, c_out, c_in, n_support, **factory))
        if modulate:
            self.modulations = nn.Parameter(torch.ones(rank, c_out, pattern.n_out, **factory))
        else:
            self.register_parameter("modulations", None)
        self.register_buffer("_index", torch.tensor(pattern.index, device=device), persistent=False)
        full = support is None or len(support) == pattern.n_classes
        self.register_buffer(
            "_support", None if full else torch.tensor(np.asarray(support), device=device), persistent=False
        )
        self._constants: dict[str, np.ndarray] = {}
        self._cache: dict[str, object] = {}
        self._snapshot: BitSnapshot | None = None
        self._cache_inference = False  # the cache holds inference tensors (filled under inference_mode)
        self._batch_paths: dict[int, str] = {}  # batch size -> path measured fastest there (see path_for)
        self.fit_error: float | None = None  # relative Frobenius error of from_dense, for reports
        self.output_error: float | None = None  # relative output error on the calibration inputs, if any

    # ------------------------------------------------------------------ constants and cache
    def _register_constant(self, name: str, value: np.ndarray) -> None:
        self._constants[name] = np.asarray(value, dtype=np.float64)
        self.register_buffer(name, self._constant_tensor(name), persistent=False)

    def _constant_tensor(self, name: str) -> torch.Tensor:
        return torch.tensor(self._constants[name], dtype=self.kernels.dtype, device=self.kernels.device)

    def _apply(self, fn: Callable, recurse: bool = True):  # type: ignore[override]
        block = _FROZEN.get(id(self))
        if block is not None and block.snapshot is not None:  # the conversion ends what the block vouched for
            block.stale |= not _same_values(block.snapshot, self._structure_params())
            block.snapshot = None
        out = super()._apply(fn, recurse)
        for name in self._constants:
            setattr(self, name, self._constant_tensor(name))
        self._cache.clear()
        self._snapshot = None
        return out

    def _explicit_path(self, unpacked: str) -> str:
        """``self.impl`` (not "auto") checked against :meth:`impls`. "packed" on a group without Gauss's form is
        the same products as the block path ``unpacked``; a path the layer does not have is an error."""
        impl = unpacked if self.impl == "packed" and "packed" not in self.impls() else self.impl
        if impl not in self.impls():
            raise ValueError(f"{type(self).__name__}({self.extra_repr()}): no path {self.impl!r}; "
                             f"choose one of {('auto', *self.impls())}")  # fmt: skip
        return impl

    batch_unit = "batch"  # what path_for's batch counts (a Linear's rows, a convolution's images)
    _batch_paths: dict[int, str] = {}  # never changed in place; for layers pickled before batch paths existed

    def path_for(self, batch: int) -> str:
        """The path ``forward`` takes on ``batch`` inputs (a Linear's rows, a convolution's images).

        With ``impl="auto"`` and :attr:`batch_paths` measured (``gmcompress.compress`` times every path on the
        example input and on one sample of it, and keeps both winners when they differ), the path measured at
        the nearest batch size on a log scale: between measured sizes ``lo < hi``, ``hi`` from ``batch**2 >= lo
        * hi`` on (exact integer arithmetic). Under ``torch.compile`` or ``torch.export`` (a symbolic batch), the
        path of the largest measured size, so one graph serves every batch. Explicit paths and unmeasured
        layers take :meth:`resolved_impl`."""
        if self.impl != "auto" or not self._batch_paths:
            return self.resolved_impl()
        sizes = list(self._batch_paths)  # ascending
        if not isinstance(batch, int) or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return self._batch_paths[sizes[-1]]
        chosen = sizes[0]
        for lo, hi in zip(sizes, sizes[1:]):
            if batch * batch >= lo * hi:
                chosen = hi
        return self._batch_paths[chosen]

    def batch_of(self, x: torch.Tensor) -> int:
        """The batch size :meth:`path_for` is asked about for input ``x``."""
        raise NotImplementedError

    @property
    def batch_paths(self) -> dict[int, str]:
        """Batch size -> the path measured fastest there (a copy; assign a dict to change them, ``{}`` to clear).
        Used when ``impl == "auto"``; see :meth:`path_for`."""
        return dict(self._batch_paths)

    @batch_paths.setter
    def batch_paths(self, paths: dict[int, str]) -> None:
        paths = dict(paths)
        bad = {b: p for b, p in paths.items() if type(b) is not int or b < 1 or p not in self.impls()}
        if bad:
            raise ValueError(f"{type(self).__name__}({self.extra_repr()}): batch paths {bad} need whole batch "
                             f"sizes >= 1 and paths among {self.impls()}")  # fmt: skip
        self._batch_paths = dict(sorted(paths.items()))

    def _impl_repr(self) -> str:
        if self.impl != "auto" or not self._batch_paths:
            return self.impl
        return "auto (" + ", ".join(f"{self.batch_unit} {b}: {p}" for b, p in self._batch_paths.items()) + ")"

    def _batch_paths_config(self) -> list[list]:
        """:attr:`batch_paths` for :meth:`config` (JSON: a list of ``[batch, path]``)."""
        return [[b, p] for b, p in self._batch_paths.items()]

    def _with_batch_paths(self, config: dict) -> GMModule:
        """``self`` with the batch paths of a :meth:`config` set (a config from before they existed has none)."""
        self.batch_paths = dict(config.get("batch_paths") or [])
        return self

    def _build(self, build: Callable[[], object]) -> object:
        """Derived weights in the parameters' precision, also under autocast (the ops that consume them
        autocast as usual; a cache filled under autocast would otherwise serve low-precision weights after it)."""
        with torch.autocast(self.kernels.device.type, enabled=False):
            return build()

    def _cache_allowed(self) -> bool:
        """No cache in training, under autograd, or while compiled or traced (``torch.jit.trace`` then records the
        weights' derivation from the parameters, as ``torch.compile`` and ``torch.export`` do)."""
        if self.training or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self._structure_params()))

    def _param(self, name: str) -> torch.Tensor | None:
        """Parameter ``name`` read from ``_parameters`` directly (``nn.Module.__getattr__`` costs 0.4 us a name on
        every call); a parametrized one through its attribute."""
        own = self._parameters
        return own[name] if name in own else getattr(self, name)

    def _structure_params(self) -> list[torch.Tensor]:
        """Kernels and modulations (if any)."""
        return [p for p in (self._param("kernels"), self._param("modulations")) if p is not None]

    def _cached(self, name: str, build: Callable[[], object]) -> object:
        """``build()``, memoised in eval mode without autograd while the parameters keep their values.

        The parameters are compared *by bits* (:func:`~gmcompress.nn.bytecmp.same_bytes`) with a snapshot taken
        when the cache was filled, so every in-place update is seen, including those that bypass the version
        counter (``p.data.mul_()``, EMA copies, weight syncs) or are made on inference tensors. The check reads
        the structured parameters once (about r/N of the dense weight for rank r and a group of order N).
        """
        if not self._cache_allowed():
            self._cache.clear()
            self._snapshot = None
            return self._build(build)
        if self._cache_inference and not torch.is_inference_mode_enabled():
            self._cache.clear()  # inference tensors cannot be saved for backward (e.g. gradients w.r.t. inputs)
            self._snapshot = None
        block = _FROZEN.get(id(self))
        if block is not None and name in self._cache and self._snapshot is block.snapshot is not None:
            return self._cache[name]  # inside frozen(), validated against the block's snapshot
        params = self._structure_params()
        if not _same_values(self._snapshot, params):
            self._cache.clear()
            self._snapshot = BitSnapshot(params)
        if name not in self._cache:
            self._cache[name] = self._build(build)
            self._cache_inference = torch.is_inference_mode_enabled()
        if block is not None and block.snapshot is None:
            block.snapshot = self._snapshot  # what this block's later calls are served from
        return self._cache[name]

    # ------------------------------------------------------------------ parameters
    def reset_structure_parameters(self, fan_in: int) -> None:
        bound = 1.0 / math.sqrt(max(1, fan_in) * self.rank)
        with torch.no_grad():
            self.kernels.uniform_(-bound, bound)
            if self.modulations is not None:
                self.modulations.fill_(1.0)

    def load_fit(self, fit: GMFit) -> None:
        """Copy kernels and modulations of a :class:`~gmcompress.structure.GMFit` into the layer."""
        if tuple(fit.kernels.shape) != tuple(self.kernels.shape):
            raise ValueError(f"fit kernels {fit.kernels.shape} do not match layer kernels {tuple(self.kernels.shape)}")
        with torch.no_grad():
            self.kernels.copy_(torch.from_numpy(np.ascontiguousarray(fit.kernels)))
            if self.modulations is not None:
                self.modulations.copy_(torch.from_numpy(np.ascontiguousarray(fit.modulations)))
        self.fit_error = float(fit.relative_error)
        self.output_error = fit.output_error

    def _copy_dense_bias(self, bias: torch.Tensor | None, out_padded: int) -> None:
        """Set the bias from a dense layer's: copied per output feature, or for a shared bias (one per output
        channel) the mean over each channel's group axis, the least-squares equivariant bias."""
        if self.bias is None:
            return
        with torch.no_grad():
            if self.bias.shape == bias.shape:
                self.bias.copy_(bias)
            else:
                padded = torch.nn.functional.pad(bias, (0, out_padded - bias.shape[0]))
                self.bias.copy_(padded.view(self.c_out, -1)[:, : self.pattern.n_out].mean(1))

    def _export(self, out: nn.Module, weight: torch.Tensor, out_features: int) -> nn.Module:
        """Fill a plain torch layer with the materialised weight and the (expanded) bias."""
        with torch.no_grad():
            out.weight.copy_(weight)
            if self.bias is not None:
                out.bias.copy_(expand_bias(self.bias, out_features, self.pattern.n_out))
        return out

    def dense_weight(self) -> torch.Tensor:
        """The materialised ``(c_out n_out, c_in n_in)`` weight of the structured part."""
        from .functional import materialize

        return materialize(self.kernels, self.modulations, self._support, self._index, self.pattern.n_classes)

    @property
    def num_structured_parameters(self) -> int:
        return sum(p.numel() for p in self._structure_params())

    def _structure_repr(self) -> str:
        dense = self.c_out * self.pattern.n_out * self.c_in * self.pattern.n_in
        ratio = dense / max(1, self.num_structured_parameters)
        return f"pattern={self.pattern.name}, rank={self.rank}, modulate={self.modulate}, compression={ratio:.1f}x"


@dataclass
class _FrozenBlock:
    """A layer's state inside :func:`frozen`: nesting depth, the parameter snapshot its cache was validated
    against on its first call in the block (None before), and whether a change was seen on the way."""

    depth: int = 0
    snapshot: BitSnapshot | None = None
    stale: bool = False


_FROZEN: dict[int, _FrozenBlock] = {}
"""The GM layers inside a frozen() block, by ``id``: a copy of a layer (``deepcopy``, pickling) is not in it."""


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``with gmcompress.frozen(model): ...``: serve the GM layers' cached weights without re-reading their
    parameters on every call (for inference loops).

    An eval-mode GM layer caches the weights its forward path needs (the dense weight, the block
    weights, the spectra) and, by default, compares its kernels and modulations with the snapshot behind
    that cache on *every* call, so that no in-place update is missed (``.data`` edits, ``copy_``,
    ``load_state_dict``, optimizer steps). That costs one read of the structured parameters per call, up to
    a third of a small-batch forward. Inside this block each layer makes the comparison on its first call
    only, and later calls are served from what that call validated. On leaving the block, every layer
    called inside is compared with that snapshot once more: if its parameters changed inside the block
    (its later outputs came from the old weights), ``RuntimeError`` names it and its cache is dropped, so
    nothing is silently wrong. Changes made before the block, or to layers not called in it, are not errors.
    Blocks nest; training mode and autograd bypass the cache as always.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, GMModule)]
    for _, m in layers:
        _FROZEN.setdefault(id(m), _FrozenBlock()).depth += 1
    failed = True
    try:
        yield model
        failed = False
    finally:
        changed = []
        for name, m in layers:
            block = _FROZEN[id(m)]
            block.depth -= 1
            if block.depth > 0:
                continue
            del _FROZEN[id(m)]
            if block.stale or (block.snapshot is not None and not _same_values(block.snapshot, m._structure_params())):
                changed.append(name or type(m).__name__)
                m._cache.clear()
                m._snapshot = None
        if changed and not failed:
            raise RuntimeError(
                f"parameters of {', '.join(changed)} changed inside gmcompress.frozen(): outputs computed after "
                "the change used the previous weights; change parameters outside the block (or leave it first)"
            )


def _same_values(snapshot: BitSnapshot | None, params: list[torch.Tensor]) -> bool:
    """Whether every parameter still holds its snapshot's bits (stricter than ``==``: -0.0 against 0.0 counts as
    a change, a NaN left in place does not)."""
    return snapshot is not None and snapshot.matches(params)


def make_bias(mode: BiasMode, c_out: int, n_out: int, out_features: int, factory: dict) -> nn.Parameter | None:
    if mode is False or mode is None:
        return None
    if mode is True:
        return nn.Parameter(torch.zeros(out_features, **factory))
    if mode == "shared":
        return nn.Parameter(torch.zeros(c_out, **factory))
    raise ValueError(f"bias must be True, False or 'shared' (one bias per output channel), got {mode!r}")


def expand_bias(bias: torch.Tensor, out_features: int, n_out: int) -> torch.Tensor:
    if bias.shape[0] == out_features:
        return bias
    return bias.repeat_interleave(n_out)[:out_features]
