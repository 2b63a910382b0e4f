"""``GMLinear``: a linear layer whose weight is a (relaxed) group matrix."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.groups import FiniteGroup, left_cosets
from ..core.groups import group as _as_group
from ..core.kernels import block_plan, full_kernels
from ..core.patterns import channel_counts, pattern_for
from ..fit import aware
from .base import BiasMode, GMModule, NotApplicable, expand_bias, make_bias
from .functional import (
    ProductPlan,
    blocks_forward,
    direct_forward,
    fft_forward,
    has_gauss_blocks,
    kernel_spectra,
    spectrum_forward,
)

IMPLS = ("auto", "dense", "blocks", "packed", "fft")
DIRECT_ROWS = 8  # the block path multiplies by the stored spectrum itself up to this many rows (direct_forward)


class GMLinear(GMModule):
    """``y = W x + b`` with ``W[o, c] = sum_k diag(a[k, o]) GM(b[k, o, c])`` (channel-major features).

    ``in_features = c_in * N`` and ``out_features = c_out * N`` for a group of order N (or the sizes of
    the coset spaces ``G/H`` and ``G/K`` with ``in_subgroup``/``out_subgroup``). Rank 1 without
    modulation is exactly G-equivariant; rank N reproduces any matrix.

    Args:
        group: a group spec (``"C16"``, ``"D8"``, ``"C4xC4"``) or a FiniteGroup.
        rank: number of modulated group-matrix terms.
        modulate: learn the modulations ``a`` (else ``a = 1``, rank 1 only).
        support: group elements the kernels may use (e.g. a stencil); all of G when None.
        bias: True (one per output feature, like nn.Linear), "shared" (one per output channel: keeps
            exact equivariance) or False.
        impl: "dense" (materialise W on every call), "blocks" (real block-diagonal basis,
            batched GEMMs; for abelian groups Gauss's three products per 2x2 block), "packed" (the same
            without Gauss's trick: fewer, wider products; where there is no Gauss form, the blocks path),
            "fft" (abelian groups), "auto" (blocks when that at least halves the multiply-adds of the dense
            product, else dense).
        pad: zero-pad sizes that are not multiples of N instead of raising.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: str | FiniteGroup,
        rank: int = 1,
        modulate: bool = True,
        support: Iterable[int] | None = None,
        bias: BiasMode = True,
        impl: str = "auto",
        *,
        in_subgroup: Sequence[int] | None = None,
        out_subgroup: Sequence[int] | None = None,
        pad: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        g = _as_group(group)
        pattern, classes = pattern_for(g, support, in_subgroup, out_subgroup)
        in_padded = _round_up(in_features, pattern.n_in) if pad else in_features
        out_padded = _round_up(out_features, pattern.n_out) if pad else out_features
        c_out, c_in = channel_counts((out_padded, in_padded), pattern, f"GMLinear({in_features}, {out_features})")
        super().__init__(pattern, c_out, c_in, rank, modulate, classes, device, dtype)
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        regular = in_subgroup is None and out_subgroup is None
        if impl in ("blocks", "packed") and not regular:
            raise ValueError(f"impl={impl!r} needs a plain group matrix (no in_subgroup/out_subgroup); use 'dense'")
        if impl == "fft" and (not regular or g.cyclic_shape is None):
            raise ValueError(f"impl='fft' needs a product of cyclic groups, got {g.name}; use 'blocks' or 'dense'")
        self.group, self._impl, self.regular = g, impl, regular
        self._paths = self._path_names()
        self.support_elements = None if support is None else [int(v) for v in support]
        self.bias_mode: BiasMode = bias
        self.in_subgroup, self.out_subgroup = in_subgroup, out_subgroup
        self.in_features, self.out_features = in_features, out_features
        self.in_padded, self.out_padded = in_padded, out_padded
        self.bias = make_bias(bias, c_out, pattern.n_out, out_features, {"device": device, "dtype": dtype})
        if regular:
            plan = block_plan(g)
            self._register_products(g)
            rho = [r if classes is None else r[classes] for r in plan.rho]
            self._n_rho = len(rho)
            for i, r in enumerate(rho):
                self._register_constant(f"_rho{i}", r)
        self._enable_spectrum()
        self._store_as(self._form_for(impl))
        self._settle_path()
        self.reset_structure_parameters(in_padded)
        if self.bias is not None:
            bound = 1.0 / np.sqrt(in_padded)
            nn.init.uniform_(self.bias, -bound, bound)

    # ------------------------------------------------------------------ construction from a dense layer
    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        group: str | FiniteGroup,
        rank: int = 1,
        modulate: bool = True,
        support: Iterable[int] | None = None,
        inputs: np.ndarray | torch.Tensor | aware.InputStats | None = None,
        *,
        impl: str = "auto",
        pad: bool = False,
        in_subgroup: Sequence[int] | None = None,
        out_subgroup: Sequence[int] | None = None,
        damping: float = aware.DAMPING,
        bias: BiasMode | None = None,
        name: str = "",
    ) -> GMLinear:
        """Fit ``linear`` by :func:`gmcompress.fit.aware.project_pattern` (activation-aware when ``inputs`` is given).

        The bias is kept per output feature (``bias=None``, exact copy) or, with ``bias="shared"``,
        replaced by its mean over each output channel's group axis (the least-squares equivariant bias).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name or 'layer'}: from_dense expects nn.Linear, got {type(linear).__name__}")
        bias_mode = (linear.bias is not None) if bias is None or linear.bias is None else bias
        layer = cls(
            linear.in_features,
            linear.out_features,
            group,
            rank,
            modulate,
            support,
            bias=bias_mode,
            impl=impl,
            pad=pad,
            in_subgroup=in_subgroup,
            out_subgroup=out_subgroup,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        label = f"{name or 'Linear'}({linear.in_features}, {linear.out_features})"
        return layer._fit_dense(linear.weight, linear.bias, inputs, damping, label)

    def _fit_dense(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        inputs: np.ndarray | torch.Tensor | aware.InputStats | None,
        damping: float,
        label: str,
    ) -> GMLinear:
        """Load the least-squares fit of the ``(out_features, in_features)`` ``weight`` and copy ``bias``.

        A per-feature bias is copied exactly; a shared one (one per output channel) is the mean of the
        dense bias over each channel's group axis, the least-squares equivariant bias.
        """
        w = F.pad(weight.detach(), (0, self.in_padded - self.in_features, 0, self.out_padded - self.out_features))
        stats = None
        if inputs is not None:
            stats = aware.InputStats.of(inputs, self.in_features, w.device).padded(self.in_padded)
        classes = None if self._support is None else self._support.cpu().numpy()
        fit = aware.project_pattern(
            w, self.pattern, self.rank, self.modulate, classes, stats, damping=damping,
            group=self.group if self.regular else None, what=label,
        )  # fmt: skip
        self.load_fit(fit)
        self._copy_dense_bias(bias, self.out_padded)
        return self

    def config(self) -> dict:
        """JSON-able constructor arguments (``GMLinear(**from_config(config()))`` rebuilds the structure)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "group": group_config(self.group),
            "rank": self.rank,
            "modulate": self.modulate,
            "support": self.support_elements,
            "bias": self.bias_mode,
            "impl": self.impl,
            "batch_paths": self._batch_paths_config(),
            "pad": self.in_padded != self.in_features or self.out_padded != self.out_features,
            "in_subgroup": None if self.in_subgroup is None else [int(v) for v in self.in_subgroup],
            "out_subgroup": None if self.out_subgroup is None else [int(v) for v in self.out_subgroup],
        }

    @classmethod
    def from_config(cls, config: dict, **factory) -> GMLinear:
        kwargs = dict(config)
        kwargs.pop("batch_paths", None)
        kwargs["group"] = group_from_config(kwargs["group"])
        return cls(**kwargs, **factory)._with_batch_paths(config)

    def to_dense(self) -> nn.Linear:
        """An equivalent ``nn.Linear`` (the materialised weight)."""
        out = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self._free().device,
            dtype=self._free().dtype,
        )
        return self._export(out, self.weight, self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight."""
        return self.dense_weight()[: self.out_features, : self.in_features]

    # ------------------------------------------------------------------ forward
    def impls(self) -> tuple[str, ...]:
        return self._paths

    def _path_names(self) -> tuple[str, ...]:
        """The paths this layer offers (fixed at construction; ``impls`` is called on every forward)."""
        if not self.regular:
            return ("dense",)
        packed = ("packed",) if has_gauss_blocks(self.group) else ()
        return ("dense", "blocks", *packed) + (("fft",) if self.group.cyclic_shape is not None else ())

    def resolved_impl(self) -> str:
        """The path ``forward`` takes without measured :attr:`batch_paths` (with them: :meth:`path_for`). "auto":
        blocks for plain GMs when they need at most half the multiply-adds of the dense product (the rest pays
        for the extra kernel launches), else dense; on a CUDA device, dense (docs/design.md, "auto")."""
        if self.impl != "auto":
            return self._explicit_path("blocks")
        if self._free().device.type == "cuda":
            return "dense"
        if self.regular and 2 * self._blocks_macs_per_row() <= self.in_padded * self.out_padded:
            return "blocks"
        return "dense"

    def _blocks_macs_per_row(self, impl: str = "blocks") -> int:
        n, rco = self.pattern.n_out, self.rank * self.c_out
        plan = self._plan(impl)
        m, size = plan.coordinates, plan.size  # product coordinates (see ProductPlan)
        gemm = plan.groups * size * size * self.c_in * rco
        modulation = rco * n if self.modulations is not None else 0
        return int(self.c_in * n * m + gemm + rco * m * n + modulation)  # transform, block products, way back, modulate

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # nn.Linear's and nn.Conv2d's name for it
        x = input
        if x.shape[-1] != self.in_features:
            raise ValueError(f"GMLinear expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        own = self._parameters
        spectrum = own.get("spectrum")
        if not self._short_way or spectrum is None:
            return self._path_forward(x)
        # the block path on the stored spectrum: the fewest Python steps
        rows = x.numel() // self.in_features
        if type(rows) is int and rows == 0:
            return self._dense_forward(x)  # no rows: nothing to block
        flat = x if x.dim() == 2 else x.reshape(rows, self.in_features)
        modulations = own["modulations"] if "modulations" in own else self.modulations
        bias = own["bias"] if "bias" in own else self.bias
        # _spectrum_products and reads_spectrum, inlined: calling them cost 0.25-0.4 us more a forward (measured)
        buffers = self._buffers
        if type(rows) is int and rows <= DIRECT_ROWS and "_q_direct_in" in buffers and not _in_graph():
            q_in, q_out = buffers["_q_direct_in"], buffers["_q_direct_out"]
            y = direct_forward(flat, q_in, q_out, spectrum, modulations, self.c_out, bias)
        else:
            q_in, q_out = buffers["_q_in"], buffers["_q_out"]
            y = spectrum_forward(flat, q_in, q_out, spectrum, self._n_pairs, modulations, self.c_out, bias)
        return y if flat is x else y.view(*x.shape[:-1], self.out_features)

    def _spectrum_products(
        self,
        x: torch.Tensor,
        rows: object,
        spectrum: torch.Tensor,
        modulations: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """The block path on the stored spectrum, ``x (rows, c_in N) -> (rows, c_out N)``: the spectrum multiplied
        directly where :meth:`reads_spectrum` says so, else Gauss's products (the spectrum and its pair sums)."""
        buffers = self._buffers
        if self.reads_spectrum(rows):
            q_in, q_out = buffers["_q_direct_in"], buffers["_q_direct_out"]
            return direct_forward(x, q_in, q_out, spectrum, modulations, self.c_out, bias)
        q_in, q_out = buffers["_q_in"], buffers["_q_out"]
        return spectrum_forward(x, q_in, q_out, spectrum, self._n_pairs, modulations, self.c_out, bias)

    _short_way = False  # see _settle_path

    def _settle_path(self) -> None:
        """Also settle whether ``forward`` takes its short way: the block path (Gauss's products, or up to
        :data:`DIRECT_ROWS` rows the stored spectrum itself), no padding, a bias per output feature or none. Whether
        the spectrum is stored is asked on each call (a parametrization registered later moves it)."""
        super()._settle_path()
        self._short_way = (
            self._settled_path == "blocks"
            and self.regular
            and self.bias_mode != "shared"
            and self.in_padded == self.in_features
            and self.out_padded == self.out_features
        )

    def _path_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` on any path: batch-dependent paths, padding, a shared bias, the kernels form."""
        rows = x.numel() // self.in_features  # batch_of, inlined
        impl = self._settled_path or self.path_for(rows)
        if impl == "dense" or (isinstance(rows, int) and rows == 0):  # no rows: nothing to block
            return self._dense_forward(x)
        n, bias = self.pattern.n_out, self._param("bias")
        flat = x.dim() == 2  # (rows, features): no leading shape to restore
        xg = x.reshape(-1, self.in_features)
        if self.in_padded != self.in_features:
            xg = F.pad(xg, (0, self.in_padded - self.in_features))
        modulations = self._param("modulations")
        if impl == "fft":
            return self._fft_forward(x, xg.view(-1, self.c_in, n), modulations, bias)
        inside = self.out_padded == self.out_features and bias is not None  # the bias added in the last pass
        inside_bias = (bias if self.bias_mode is True else expand_bias(bias, self.out_features, n)) if inside else None
        spectrum = self._parameters.get("spectrum") if impl == "blocks" else None
        if spectrum is not None:
            y = self._spectrum_products(xg, rows, spectrum, modulations, inside_bias)
        else:
            q_in, q_out = ("_q_packed", "_q_packed") if impl == "packed" else ("_q_in", "_q_out")
            q_in, q_out = self._buffers[q_in], self._buffers[q_out]
            y = blocks_forward(xg, q_in, q_out, self._block_weights(impl), modulations, self.c_out, inside_bias)
        if self.out_padded != self.out_features:
            y = y[:, : self.out_features]
        if bias is not None and not inside:
            y = y + expand_bias(bias, self.out_features, n)
        return y if flat and inside else y.reshape(*x.shape[:-1], self.out_features)

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One GEMM with the weight trimmed to the real features, the bias inside (nn.Linear's op)."""
        bias = self._param("bias")
        bias = None if bias is None else expand_bias(bias, self.out_features, self.pattern.n_out)
        return F.linear(x, self.weight, bias)

    def _fft_forward(
        self, x: torch.Tensor, xg: torch.Tensor, modulations: torch.Tensor | None, bias: torch.Tensor | None
    ) -> torch.Tensor:
        self._check_fft_not_in_onnx_export()
        y = fft_forward(xg, self._kernel_spectra(), self.group.cyclic_shape, self.rank)
        y = y[:, 0] if modulations is None else (y * modulations).sum(1)
        y = y.reshape(-1, self.out_padded)[:, : self.out_features]
        if bias is not None:
            y = y + expand_bias(bias, self.out_features, self.pattern.n_out)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _check_fft_not_in_onnx_export(self) -> None:
        """torch.onnx cannot export the fft path: one error naming this layer and its way out, not the exporter's.
        Asked only while tracing or exporting (``torch.onnx.is_in_onnx_export`` takes microseconds)."""
        if (torch.jit.is_tracing() or torch.compiler.is_exporting()) and _in_onnx_export():
            raise RuntimeError(
                f"GMLinear({self.extra_repr()}) runs its 'fft' path, which torch.onnx cannot export (neither its "
                "rfftn nor its complex bmm): set this layer's impl to 'blocks' (the same outputs up to rounding) or "
                "'dense' before exporting, e.g. layer.impl = 'blocks'"
            )

    def _kernel_spectra(self) -> torch.Tensor:
        return kernel_spectra(full_kernels(self.kernels, self._support, self.pattern.n_out), self.group.cyclic_shape)

    def _spectrum_group(self) -> FiniteGroup | None:
        return self.group if self.regular and self._support is None else None

    def _plan(self, impl: str) -> ProductPlan:
        return self._packed if impl == "packed" else self._products

    def reads_spectrum(self, rows: object) -> bool:
        """Whether the block path at ``rows`` rows multiplies by the stored spectrum itself
        (:func:`~gmcompress.nn.functional.direct_forward`: four products a 2x2 block, no weight derived) rather than
        by Gauss's derived weights: at most :data:`DIRECT_ROWS` rows of a layer that stores a spectrum with 2x2
        blocks, in eager mode (traced, compiled or exported graphs keep one form for every batch)."""
        return (
            isinstance(rows, int)
            and rows <= DIRECT_ROWS
            and "spectrum" in self._parameters
            and "_q_direct_in" in self._buffers
            and not _in_graph()
        )

    def _block_weights(self, impl: str = "blocks") -> torch.Tensor:
        """The right-hand sides of the block products of path ``impl``, laid out for ``bmm``."""
        return self._product_weights(self._plan(impl)).contiguous()

    batch_unit = "rows"

    def batch_of(self, x: torch.Tensor) -> int:
        """Rows: every leading index of ``x`` is one."""
        return x.numel() // self.in_features

    def macs(self, inp: torch.Tensor, out: torch.Tensor) -> int:
        """Multiply-accumulates of one call: rows of ``inp`` times :meth:`macs_per_row`."""
        rows = self.batch_of(inp)
        impl = self.path_for(rows)
        if impl == "blocks" and self.reads_spectrum(rows):
            n, rco = self.pattern.n_out, self.rank * self.c_out
            modulation = rco * n if self.modulations is not None else 0
            return rows * (2 * n * n * (self.c_in + rco) + 2 * n * self.c_in * rco + modulation)  # direct_forward
        return rows * self.macs_per_row(impl)

    def macs_per_row(self, impl: str | None = None) -> int:
        """Multiply-accumulates per input row on path ``impl`` (default: the one :meth:`resolved_impl` names), the
        real cost, not the dense one.

        blocks: ``c_in N^2`` (basis change) + ``sum_blocks d^2 c_in r c_out`` (block GEMMs) +
        ``r c_out N^2`` (back) + ``r c_out N`` (modulation); fft: the block GEMMs in complex arithmetic plus
        ``~2.5 N log2 N`` per channel and transform (an estimate); dense: ``in * out``.
        """
        impl = impl or self.resolved_impl()
        if impl == "dense":
            return self.in_features * self.out_features
        if impl in ("blocks", "packed"):
            return self._blocks_macs_per_row(impl)
        n, rco = self.pattern.n_out, self.rank * self.c_out
        mod = rco * n if self.modulations is not None else 0
        n_freq = n // self.group.cyclic_shape[-1] * (self.group.cyclic_shape[-1] // 2 + 1)
        transforms = 2.5 * n * np.log2(max(n, 2)) * (self.c_in + rco)
        return int(transforms + 4 * n_freq * self.c_in * rco + mod)

    # ------------------------------------------------------------------ equivariance
    def group_action(self, h: int, space: str = "in") -> torch.Tensor:
        """Index ``perm`` with ``(h . x)[..., c, p] = x[..., c, perm[p]]`` on the input or output space.

        Regular: ``(L_h x)(g) = x(h^{-1} g)``; coset spaces: ``(h . x)(gH) = x(h^{-1} g H)``.
        """
        g = self.group
        sub = self.in_subgroup if space == "in" else self.out_subgroup
        if sub is None:
            return torch.tensor(g.table[g.inverse[h]])
        cosets = left_cosets(g, sub)
        coset_of = np.empty(g.order, dtype=np.int64)
        coset_of[cosets.ravel()] = np.repeat(np.arange(len(cosets)), cosets.shape[1])
        return torch.as_tensor(coset_of[g.table[g.inverse[h], cosets[:, 0]]])

    @torch.no_grad()
    def check_equivariance(
        self, x: torch.Tensor | None = None, elements: Iterable[int] | None = None, bias: bool = True
    ) -> float:
        """Max over group elements h of ``||f(h . x) - h . f(x)|| / ||f(x)||`` (0 up to rounding for exact GMs).

        ``bias=False`` measures the structured weight alone (a per-feature bias copied from a dense
        layer is not equivariant). Padded layers cannot be checked (the group does not act on padding).
        """
        if self.in_padded != self.in_features or self.out_padded != self.out_features:
            raise NotApplicable(f"{self.extra_repr()}: the group does not act on zero-padded features")
        if x is None:
            x = torch.randn(8, self.in_features, dtype=self._free().dtype, device=self._free().device)
        offset = expand_bias(self.bias, self.out_features, self.pattern.n_out) if self.bias is not None else 0.0

        def f(v: torch.Tensor) -> torch.Tensor:
            y = GMLinear.forward(self, v)  # on the feature axis, also for subclasses that move it
            return y if bias else y - offset

        y = f(x)
        n_in, n_out = self.pattern.n_in, self.pattern.n_out
        worst = 0.0
        for h in elements if elements is not None else range(self.group.order):
            pin, pout = self.group_action(h, "in"), self.group_action(h, "out")
            hx = x.reshape(*x.shape[:-1], self.c_in, n_in)[..., pin].reshape(x.shape)
            hy = y.reshape(*y.shape[:-1], self.c_out, n_out)[..., pout].reshape(y.shape)
            worst = max(worst, float((f(hx) - hy).norm() / y.norm().clamp_min(1e-30)))
        return worst

    def extra_repr(self) -> str:
        extra = (
            f", padded=({self.in_padded}, {self.out_padded})"
            if self.in_padded != self.in_features or self.out_padded != self.out_features
            else ""
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group={self.group.name}, "
            f"{self._structure_repr()}, impl={self._impl_repr()}, bias={self.bias is not None}{extra}"
        )


def _in_graph() -> bool:
    """Whether this call is compiled, exported or traced (the graph keeps one form of the block path for every
    batch). ``torch._C._is_tracing`` is what ``torch.jit.is_tracing`` asks after its TorchScript check, which
    costs a Python call on every forward and cannot apply here (these layers are not scripted)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch._C._is_tracing()


def _in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()``, also inside the strict (dynamo) trace of ``torch.onnx.export(dynamo=True)``,
    where dynamo reads that function as False: there the exporter's own flag says it (a private module of torch
    2.x; without it, False)."""
    if torch.onnx.is_in_onnx_export():
        return True
    try:
        from torch.onnx._internal.exporter import _flags
    except ImportError:
        return False
    return bool(getattr(_flags, "_is_onnx_exporting", False))


def group_config(g: FiniteGroup) -> dict:
    """A JSON-able description of a group: its spec when the spec rebuilds it, else its Cayley table."""
    try:
        if _as_group(g.name) == g:
            return {"spec": g.name}
    except ValueError:
        pass
    return {"name": g.name, "table": g.table.tolist()}


def group_from_config(config: dict) -> FiniteGroup:
    if "spec" in config:
        return _as_group(config["spec"])
    return FiniteGroup(np.asarray(config["table"]), name=config.get("name"), validate=True)


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m
