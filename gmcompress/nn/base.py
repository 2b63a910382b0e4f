"""The GM layer protocol (:class:`GMLayer`) and the shared machinery of the weighted GM layers (:class:`GMModule`).

Every GM layer answers the same questions, so that compression, reports and save/load never need to
know a layer's class: ``from_dense`` (fit a dense layer), ``to_dense`` (export a plain torch layer),
``config``/``from_config`` (rebuild the structure), ``check_equivariance`` and ``macs``. A method that
makes no sense for a layer raises :class:`NotApplicable` saying why. Subclasses register themselves
by class name in :data:`GM_LAYERS` (what ``gmcompress.save`` writes as a layer's kind).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..core.checks import check_rank
from ..core.groups import FiniteGroup
from ..core.kernels import materialize
from ..core.patterns import GMFit, Pattern
from .functional import (
    ProductPlan,
    direct_plan,
    gauss_weights,
    has_gauss_blocks,
    packed_index,
    packed_weights,
    product_plan,
    product_weights,
    spectrum_map,
)

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


_IN_PLACE_OPERATORS = frozenset(
    f"__i{op}__" for op in "add sub mul truediv floordiv mod pow and or xor lshift rshift matmul".split()
)  # x += y and the like
_METADATA_METHODS = frozenset({"requires_grad_", "share_memory_"})  # end in "_" but write no values


class DerivedKernels(torch.Tensor):
    """The kernels of a layer storing ``spectrum``, derived on this read: it reads like any tensor (fresh results are
    plain tensors; views, ``.data`` and ``.detach()`` stay derived kernels, ``.numpy()`` is read-only), but an
    in-place write to it, to a view of it or to its ``.data`` raises, since the layer would not see it."""

    layer_name: str  # the class of the layer the kernels were read from (for the error)

    @classmethod
    def of(cls, kernels: torch.Tensor, layer_name: str) -> DerivedKernels:
        derived = kernels.as_subclass(cls)
        derived.layer_name = layer_name
        return derived

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sources = _derived_arguments(args, kwargs)
        write = _in_place_write(func, args, kwargs)
        if write is not None:
            raise RuntimeError(_derived_write_message(sources[0].layer_name, write))
        if func in (torch.Tensor.__deepcopy__, torch.Tensor.__reduce_ex__):  # copies and pickles are plain tensors
            args = (args[0].as_subclass(torch.Tensor), *args[1:])
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
            return _keep_derived_on_shared(result, sources)


def _derived_arguments(args: tuple, kwargs: dict) -> list[DerivedKernels]:
    """The derived kernels among the arguments (also inside a list or tuple argument, as ``torch.cat`` takes)."""
    found = []
    for value in (*args, *kwargs.values()):
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if type(item) is DerivedKernels:
                found.append(item)
    return found


def _in_place_write(func, args: tuple, kwargs: dict) -> str | None:
    """How ``func(*args, **kwargs)`` writes into derived kernels in place (for the error), or None if it does not."""
    name = getattr(func, "__name__", "")
    target = args[0] if args else kwargs.get("tensor", kwargs.get("input"))  # torch.nn.init passes tensor=
    if type(target) is DerivedKernels:
        if name == "__set__":  # a property setter: only .data writes values
            return "assignment to .data" if getattr(func.__self__, "__name__", "") == "data" else None
        if name == "__setitem__":
            return "item assignment"
        in_place_method = name.endswith("_") and not name.startswith("__") and name not in _METADATA_METHODS
        if name in _IN_PLACE_OPERATORS or in_place_method:
            return name
        if kwargs.get("inplace") is True:
            return f"{name}(inplace=True)"
    out = kwargs.get("out")
    if any(type(t) is DerivedKernels for t in (out if isinstance(out, (list, tuple)) else (out,))):
        return f"{name}(out=...)"
    return None


def _derived_write_message(layer_name: str, write: str) -> str:
    return (
        f"{layer_name}.kernels is derived from the stored `spectrum` parameter on every read (stored_form "
        f"'spectrum'): an in-place write ({write}) to it, a view of it or its .data would change a temporary tensor, "
        f'not the layer. Write the kernels with layer.set_kernels(new_kernels), or set layer.impl = "dense" (a path '
        f"storing the `kernels` parameter) first."
    )


def _keep_derived_on_shared(result, sources: list[DerivedKernels]):
    """``result`` (called with torch functions of subclasses disabled) with its tensors on the storage of a derived
    kernels source kept as derived kernels, its numpy arrays on that storage read-only, every other tensor plain."""
    if isinstance(result, torch.Tensor):
        return _rewrapped(result, sources)
    if isinstance(result, np.ndarray):
        if any(_storage_span(s)[0] <= result.__array_interface__["data"][0] < _storage_span(s)[1] for s in sources):
            result.flags.writeable = False
        return result
    if isinstance(result, (tuple, list)) and not isinstance(result, torch.Size):
        return pytree.tree_map_only(torch.Tensor, lambda t: _rewrapped(t, sources), result)
    return result


def _rewrapped(tensor: torch.Tensor, sources: list[DerivedKernels]) -> torch.Tensor:
    start = _storage_span(tensor)[0]
    if any(lo <= start < hi for lo, hi in map(_storage_span, sources)):
        return tensor if type(tensor) is DerivedKernels else DerivedKernels.of(tensor, sources[0].layer_name)
    return tensor.as_subclass(torch.Tensor) if type(tensor) is DerivedKernels else tensor


def _storage_span(tensor: torch.Tensor) -> tuple[int, int]:
    """The address range ``[start, end)`` of ``tensor``'s storage; empty without one (functorch wrappers, sparse)."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return (0, 0)
    start = storage.data_ptr()
    return (start, start + storage.nbytes()) if start else (0, 0)


class GMModule(GMLayer):
    """Base of the GM layers: kernels ``(r, c_out, c_in, |S|)`` and modulations ``(r, c_out, n_out)``.

    The kernels are stored in one of two forms (docs/design.md, "Stored form"): as the parameter ``kernels``, or,
    on a block path of a layer that has one, as the parameter ``spectrum`` ``(N, c_in, r c_out)``, their
    coordinates in the real block basis, which the block products multiply. ``kernels`` is then derived on every
    read (read-only). Setting ``impl`` converts between the forms (exactly, in float64); state_dicts of either form
    load into either (:meth:`convert_state`). ``forward`` reads parameters and constant buffers only: nothing is
    cached, so every change of a parameter is seen on the next call.

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
        self._spectral = False  # whether the spectrum form exists (set by _enable_spectrum)
        self._batch_paths: dict[int, str] = {}  # batch size -> path measured fastest there (see path_for)
        self.fit_error: float | None = None  # relative Frobenius error of from_dense, for reports
        self.output_error: float | None = None  # relative output error on the calibration inputs, if any

    def __setstate__(self, state: dict) -> None:
        """Unpickle, also a layer pickled whole before the stored form existed (``impl`` a plain attribute, an eval
        cache): it keeps its kernels form, and its first ``impl`` assignment converts as usual."""
        if "impl" in state:
            state["_impl"] = state.pop("impl")
        for stale in ("_cache", "_snapshot", "_cache_inference"):
            state.pop(stale, None)
        super().__setstate__(state)
        if "_spectral" not in state:
            self._spectral = False
            if self._spectrum_group() is not None:  # the products as this version orders them (role-major)
                self._register_products(self._spectrum_group())
            self._enable_spectrum()
        self._settle_path()

    # ------------------------------------------------------------------ constants
    def _register_constant(self, name: str, value: np.ndarray) -> None:
        self._constants[name] = np.asarray(value, dtype=np.float64)
        self.register_buffer(name, self._constant_tensor(name), persistent=False)

    def _constant_tensor(self, name: str) -> torch.Tensor:
        free = self._free()
        return torch.tensor(self._constants[name], dtype=free.dtype, device=free.device)

    def _apply(self, fn: Callable, recurse: bool = True):  # type: ignore[override]
        out = super()._apply(fn, recurse)
        for name in self._constants:
            setattr(self, name, self._constant_tensor(name))
        self._settle_path()  # "auto" takes another path on another device
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
    _settled_path: str | None = None  # see _settle_path; None: resolved on each call

    def _settle_path(self) -> None:
        """Settle the path ``forward`` takes when it does not depend on the batch (an explicit ``impl``, or "auto"
        without measured batch paths), so that a call reads one attribute instead of resolving it. It depends on
        ``impl``, the batch paths and the device only (never on tensor values), and is settled again whenever one
        of them changes: the ``impl`` and ``batch_paths`` setters, ``.to()`` and the like (``_apply``), loading a
        state_dict, unpickling."""
        self._settled_path = None  # resolved_impl below resolves; it never reads the settled path
        if "_impl" in self.__dict__ and (self._impl != "auto" or not self._batch_paths):
            self._settled_path = self.resolved_impl()

    def path_for(self, batch: int) -> str:
        """The path ``forward`` takes on ``batch`` inputs (a Linear's rows, a convolution's images).

        With ``impl="auto"`` and :attr:`batch_paths` measured (``gmcompress.compress`` times every path on the
        example input and on one sample of it, and keeps both winners when they differ), the path measured at
        the nearest batch size on a log scale: between measured sizes ``lo < hi``, ``hi`` from ``batch**2 >= lo
        * hi`` on (exact integer arithmetic). Under ``torch.compile`` or ``torch.export`` (a symbolic batch), the
        path of the largest measured size, so one graph serves every batch. Explicit paths and unmeasured
        layers take :meth:`resolved_impl`."""
        settled = self._settled_path
        if settled is not None:
            return settled
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
        self._store_as(self._form_for(self.impl))
        self._settle_path()

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

    def _param(self, name: str) -> torch.Tensor | None:
        """Parameter ``name`` read from ``_parameters`` directly (``nn.Module.__getattr__`` costs 0.4 us a name on
        every call); a parametrized one through its attribute."""
        own = self._parameters
        return own[name] if name in own else getattr(self, name)

    def _structure_params(self) -> list[torch.Tensor]:
        """The stored kernels (``kernels`` or ``spectrum``) and the modulations (if any)."""
        return [p for p in (self._free(), self._param("modulations")) if p is not None]

    # ------------------------------------------------------------------ stored form
    @property
    def kernels(self) -> torch.Tensor:
        """The kernels ``(r, c_out, c_in, |S|)``: the parameter itself, or derived from ``spectrum`` as
        :class:`DerivedKernels`, whose in-place writes raise (write through :meth:`set_kernels`, or set ``impl`` to a
        path stored as kernels first)."""
        own = self._parameters
        if "kernels" in own:
            return own["kernels"]
        if "spectrum" in own:
            kernels = self._spectrum_to_kernels(own["spectrum"])
            return kernels if torch.compiler.is_compiling() else DerivedKernels.of(kernels, type(self).__name__)
        raise AttributeError(f"{type(self).__name__} has no kernels yet")

    def _free(self) -> torch.Tensor:
        """The stored kernels: the ``spectrum`` parameter, or ``kernels`` (through a parametrization if any)."""
        own = self._parameters
        return own["spectrum"] if "spectrum" in own else self._param("kernels")

    @property
    def stored_form(self) -> str:
        """How the kernels are stored: "spectrum" (block coordinates) or "kernels"."""
        return "spectrum" if "spectrum" in self._parameters else "kernels"

    _SPECTRUM_PATHS = ("blocks", "packed", "grouped")  # the paths whose products read the spectrum

    def _form_for(self, impl: str) -> str:
        """The form path ``impl`` stores: "spectrum" for a block path of a layer with that form (full kernel support,
        an abelian group, no parametrization of ``kernels``), else "kernels". "auto" stores the form of the path it
        takes now (with measured batch paths, the one of the largest batch)."""
        if not self._spectral or "kernels" in getattr(self, "parametrizations", {}):
            return "kernels"
        if impl == "auto":
            impl = self._batch_paths[max(self._batch_paths)] if self._batch_paths else self.resolved_impl()
        return "spectrum" if impl in self._SPECTRUM_PATHS else "kernels"

    def _register_products(self, g: FiniteGroup) -> None:
        """The block products of ``g`` (:func:`~gmcompress.nn.functional.product_plan`): the Gauss (or packed) plan
        and its basis changes ``_q_in``, ``_q_out``; the packed plan, and ``_q_packed`` where it is a path of its own
        (the group has Gauss's 2x2 blocks)."""
        self._products = product_plan(g)
        self._register_constant("_q_in", self._products.q_in)
        self._register_constant("_q_out", self._products.q_out)
        self._packed = product_plan(g, gauss=False)
        if has_gauss_blocks(g):
            self._register_constant("_q_packed", self._packed.q_in)

    def _spectrum_group(self) -> FiniteGroup | None:
        """The group whose block coordinates may store the kernels: None unless the layer is a plain group matrix with
        full kernel support (a stencil has fewer values than the blocks)."""
        return None

    def _enable_spectrum(self) -> None:
        """Let the layer store its kernels as a spectrum when :meth:`_spectrum_group`'s blocks have a Gauss form
        (abelian groups; :func:`~gmcompress.nn.functional.spectrum_map`): register the map, its inverse and the
        packed products' index as constants."""
        g = self._spectrum_group()
        to_spectrum = None if g is None else spectrum_map(g)
        if to_spectrum is None:
            return
        self._register_constant("_to_spectrum", to_spectrum)
        self._register_constant("_from_spectrum", np.linalg.inv(to_spectrum))
        self._n_pairs = sum(1 for _, _, role in product_plan(g).parts if role == 1)
        direct = direct_plan(g)
        if direct is not None:  # the block products read from the spectrum itself (GMLinear.reads_spectrum)
            self._register_constant("_q_direct_in", direct[0])
            self._register_constant("_q_direct_out", direct[1])
        if self._n_pairs:
            index, sign = packed_index(g)
            self.register_buffer("_packed_index", torch.as_tensor(index, device=self._free().device), persistent=False)
            self._register_constant("_packed_sign", sign)
        self._spectral = True

    def _product_weights(self, plan: ProductPlan) -> torch.Tensor:
        """The right-hand sides ``(groups, size c_in, size r c_out)`` of ``plan``'s block products, derived from the
        stored form: the Gauss pieces or packed blocks of a spectrum, else from the kernels."""
        own = self._parameters
        if "spectrum" in own:
            if plan.parts is not None:
                return gauss_weights(own["spectrum"], self._n_pairs)
            return packed_weights(own["spectrum"], self._buffers["_packed_index"], self._buffers["_packed_sign"])
        rho = [self._buffers[f"_rho{i}"] for i in range(self._n_rho)]  # restricted to the kernel support
        return product_weights(self._param("kernels"), rho, plan)

    def _kernels_to_spectrum(self, kernels: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """``(r, c_out, c_in, N) -> (N, c_in, r c_out)``: ``spectrum[f, i, (k, o)] = sum_s T[f, s] kernels[k, o, i, s]``
        (``T`` the ``_to_spectrum`` constant unless ``matrix`` is given)."""
        r, c_out, c_in, n = kernels.shape
        matrix = self._buffers["_to_spectrum"] if matrix is None else matrix
        flat = kernels.permute(3, 2, 0, 1).reshape(n, c_in * r * c_out)
        return torch.mm(matrix, flat).view(n, c_in, r * c_out)

    def _spectrum_to_kernels(self, spectrum: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """The inverse of :meth:`_kernels_to_spectrum`."""
        n, c_in, _ = spectrum.shape
        matrix = self._buffers["_from_spectrum"] if matrix is None else matrix
        flat = torch.mm(matrix, spectrum.reshape(n, -1))
        return flat.view(n, c_in, self.rank, self.c_out).permute(2, 3, 1, 0)

    def _converted(self, value: torch.Tensor, form: str) -> torch.Tensor:
        """``value`` (kernels or spectrum, the other form) converted to ``form`` in float64, in ``value``'s dtype."""
        name = "_to_spectrum" if form == "spectrum" else "_from_spectrum"
        matrix = torch.tensor(self._constants[name], dtype=torch.float64, device=value.device)
        convert = self._kernels_to_spectrum if form == "spectrum" else self._spectrum_to_kernels
        return convert(value.detach().double(), matrix).to(value.dtype).contiguous()

    def _store_as(self, form: str) -> None:
        """Convert the stored kernels to ``form`` ("spectrum" or "kernels"); the parameter is replaced (an optimizer
        made before holds the old one, so set the path before making it), keeping its place in the state_dict and its
        ``requires_grad``."""
        if form == self.stored_form:
            return
        old_name = self.stored_form
        old = self._parameters[old_name]
        with torch.inference_mode(False), torch.no_grad():  # an ordinary parameter, also when set in inference mode
            new = nn.Parameter(self._converted(old, form), requires_grad=old.requires_grad)
        params = list(self._parameters.items())
        self._parameters.clear()
        for name, value in params:
            if name == old_name:
                name, value = form, new
            self._parameters[name] = value

    def set_kernels(self, kernels: torch.Tensor) -> None:
        """Write ``kernels`` ``(r, c_out, c_in, |S|)`` into the stored form (converted in float64)."""
        free = self._free()
        with torch.no_grad():
            if self.stored_form == "kernels":
                free.copy_(kernels)
            else:
                free.copy_(self._converted(kernels.to(device=free.device, dtype=torch.float64), "spectrum"))

    def _kernel_shape(self) -> tuple[int, ...]:
        free = self._free()
        if self.stored_form == "kernels":
            return tuple(free.shape)
        return (self.rank, self.c_out, free.shape[1], free.shape[0])

    def convert_state(self, state: dict, prefix: str = "") -> None:
        """Rewrite, in place, a state_dict entry of the other form (``prefix + "kernels"`` or ``"spectrum"``, from
        a checkpoint saved before this form existed or while the layer took another path) into this layer's form.
        Entries of another shape are left for the loader to report."""
        have = self.stored_form
        other = "kernels" if have == "spectrum" else "spectrum"
        key = prefix + other
        if not self._spectral or key not in state or prefix + have in state:
            return
        value = state[key]
        shapes = {"kernels": self._kernel_shape(), "spectrum": None}
        shapes["spectrum"] = (shapes["kernels"][3], shapes["kernels"][2], self.rank * self.c_out)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shapes[other]:
            return
        del state[key]
        state[prefix + have] = self._converted(value, have)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        self.convert_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._settle_path()  # load_state_dict(assign=True) may bring the parameters to another device

    @property
    def impl(self) -> str:
        """The forward path ("auto" or one of :meth:`impls`). Setting it stores the kernels in that path's form."""
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        valid = ("auto", *self.impls())
        if "packed" not in valid and any(p in valid for p in ("blocks", "grouped")):
            valid += ("packed",)  # the block path's products where the group has no Gauss form
        if value not in valid:
            raise ValueError(f"{type(self).__name__}({self.extra_repr()}): no path {value!r}; choose one of {valid}")
        self._impl = value
        self._store_as(self._form_for(value))
        self._settle_path()

    # ------------------------------------------------------------------ parameters
    def reset_structure_parameters(self, fan_in: int) -> None:
        bound = 1.0 / math.sqrt(max(1, fan_in) * self.rank)
        free = self._free()
        kernels = torch.empty(self._kernel_shape(), dtype=free.dtype, device=free.device).uniform_(-bound, bound)
        self.set_kernels(kernels)
        if self.modulations is not None:
            with torch.no_grad():
                self.modulations.fill_(1.0)

    def load_fit(self, fit: GMFit) -> None:
        """Write kernels and modulations of a :class:`~gmcompress.core.patterns.GMFit` into the layer's parameters."""
        if tuple(fit.kernels.shape) != self._kernel_shape():
            raise ValueError(f"fit kernels {fit.kernels.shape} do not match layer kernels {self._kernel_shape()}")
        self.set_kernels(torch.from_numpy(np.ascontiguousarray(fit.kernels)))
        with torch.no_grad():
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
        return materialize(self.kernels, self.modulations, self._support, self._index, self.pattern.n_classes)

    @property
    def num_structured_parameters(self) -> int:
        return sum(p.numel() for p in self._structure_params())

    def _structure_repr(self) -> str:
        dense = self.c_out * self.pattern.n_out * self.c_in * self.pattern.n_in
        ratio = dense / max(1, self.num_structured_parameters)
        return f"pattern={self.pattern.name}, rank={self.rank}, modulate={self.modulate}, compression={ratio:.1f}x"


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
