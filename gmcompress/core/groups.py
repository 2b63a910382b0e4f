"""Finite groups as integer Cayley tables.

Convention (docs/design.md section 2): a group of order N has elements 0..N-1 and an integer table with
``table[a, b] = index of g_a g_b``. Products of groups index their elements row-major:
``(a, b) -> a * |H| + b``, so ``C_H x C_W`` numbers pixel (h, w) as ``h * W + w``.

Groups are immutable, hashable (by their table) and cheap to pass around; anything derived from a
group that costs more than a table lookup (the real regular basis, cosets) is cached per group.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .checks import MAX_GROUP_ORDER, check_group_order, group_order_error, short_repr

__all__ = [
    "FiniteGroup",
    "RegularBasis",
    "cyclic",
    "dihedral",
    "symmetric",
    "direct_product",
    "semidirect_product",
    "from_table",
    "from_permutations",
    "group",
    "spec_of",
    "subgroup",
    "left_cosets",
    "regular_basis",
]


class FiniteGroup:
    """A finite group given by its Cayley table.

    Attributes:
        table: ``(N, N)`` integer array, ``table[a, b]`` is the index of ``g_a g_b``.
        inverse: ``(N,)`` integer array, ``inverse[a]`` is the index of ``g_a^{-1}``.
        identity: index of the identity element.
        names: readable element names.
        name: a short name such as ``"C8"`` or ``"D4xC2"``.
        cyclic_shape: orders ``(n_1, .., n_k)`` when the group is ``C_{n_1} x .. x C_{n_k}`` with
            elements indexed row-major (enables the FFT path); ``None`` otherwise.
    """

    __slots__ = ("table", "inverse", "identity", "names", "name", "cyclic_shape", "_hash", "__weakref__")

    def __init__(
        self,
        table: np.ndarray,
        *,
        names: Sequence[str] | None = None,
        name: str | None = None,
        cyclic_shape: tuple[int, ...] | None = None,
        validate: bool = True,
    ) -> None:
        table = np.ascontiguousarray(np.asarray(table, dtype=np.int64))
        if validate:
            _validate_table(table)
        n = table.shape[0]
        identity_candidates = np.flatnonzero((table == np.arange(n)[None, :]).all(axis=1))
        identity = int(identity_candidates[0])
        inverse = np.argmax(table == identity, axis=1).astype(np.int64)
        table.setflags(write=False)
        inverse.setflags(write=False)
        self.table = table
        self.inverse = inverse
        self.identity = identity
        self.names = tuple(names) if names is not None else tuple(f"g{i}" for i in range(n))
        if len(self.names) != n:
            raise ValueError(f"got {len(self.names)} names for a group of order {n}")
        self.name = name or f"G{n}"
        self.cyclic_shape = cyclic_shape
        self._hash = hash(table.tobytes())

    @property
    def order(self) -> int:
        # the names' count (validated equal to the table's size): a plain tuple length, where a forward under
        # torch.compile reading the numpy table's shape makes dynamo guard on the table, a guard that fails on its
        # own frame under torch.inference_mode (torch 2.13)
        return len(self.names)

    @property
    def is_abelian(self) -> bool:
        return bool(np.array_equal(self.table, self.table.T))

    def left_action(self, h: int) -> np.ndarray:
        """Permutation matrix of the left translation ``(L_h x)(g) = x(h^{-1} g)``."""
        n = self.order
        perm = np.zeros((n, n))
        perm[np.arange(n), self.table[self.inverse[h]]] = 1.0
        return perm

    def right_shift_index(self) -> np.ndarray:
        """``(N, N)`` index ``D[i, j] = idx(g_i^{-1} g_j)``: the group-matrix pattern."""
        return self.table[self.inverse]

    def __len__(self) -> int:
        return self.order

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FiniteGroup) and np.array_equal(self.table, other.table)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"FiniteGroup({self.name}, order={self.order})"

    def __reduce__(self):  # picklable despite __slots__
        return (_rebuild, (self.table.copy(), self.names, self.name, self.cyclic_shape))


def _rebuild(table, names, name, cyclic_shape) -> FiniteGroup:
    return FiniteGroup(table, names=names, name=name, cyclic_shape=cyclic_shape, validate=False)


def _validate_table(table: np.ndarray) -> None:
    if table.ndim != 2 or table.shape[0] != table.shape[1] or table.shape[0] == 0:
        raise ValueError(f"a Cayley table must be a non-empty square matrix, got shape {table.shape}")
    n = table.shape[0]
    if table.min() < 0 or table.max() >= n:
        raise ValueError(f"closure fails: table entries must lie in 0..{n - 1}")
    ar = np.arange(n)
    for axis, what in ((0, "column"), (1, "row")):
        if not (np.sort(table, axis=axis) == (ar[:, None] if axis == 0 else ar[None, :])).all():
            raise ValueError(f"not a group: some {what} of the table is not a permutation (no inverses)")
    ident = np.flatnonzero((table == ar[None, :]).all(axis=1) & (table == ar[:, None]).all(axis=0))
    if ident.size != 1:
        raise ValueError("not a group: no two-sided identity element")
    # associativity: (ab)c == a(bc), chunked over a to bound memory
    chunk = max(1, int(4_000_000 // (n * n)))
    for start in range(0, n, chunk):
        a = ar[start : start + chunk]
        left = table[table[a][:, :, None], ar[None, None, :]]  # (ab)c
        right = table[a[:, None, None], table[None, :, :]]  # a(bc)
        if not np.array_equal(left, right):
            raise ValueError("not a group: the table is not associative")


# ----------------------------------------------------------------------------------------------
# constructors


def from_table(table: np.ndarray | Sequence[Sequence[int]], names: Sequence[str] | None = None) -> FiniteGroup:
    """A group from a Cayley table, validated (closure, associativity, identity, inverses)."""
    check_group_order(len(table), "from_table")
    return FiniteGroup(np.asarray(table), names=names, validate=True)


@functools.cache
def cyclic(n: int) -> FiniteGroup:
    """The cyclic group C_n: element k is the rotation r^k, ``k1 * k2 = (k1 + k2) mod n``."""
    n = _positive(n, "cyclic group order")
    check_group_order(n, f"C{n}")
    ar = np.arange(n)
    names = ["e" if k == 0 else ("r" if k == 1 else f"r^{k}") for k in range(n)]
    return FiniteGroup((ar[:, None] + ar[None, :]) % n, names=names, name=f"C{n}", cyclic_shape=(n,), validate=False)


@functools.cache
def dihedral(n: int) -> FiniteGroup:
    """The dihedral group of the regular n-gon, order 2n (``D4`` is the square's group, order 8).

    Element ``f * n + k`` is ``r^k s^f`` (rotation by 2 pi k / n after an optional reflection s),
    with ``s r s = r^{-1}``, so ``(r^a s^f)(r^b s^g) = r^(a + (-1)^f b) s^(f + g)``.
    """
    n = _positive(n, "dihedral group n")
    check_group_order(2 * n, f"D{n}")
    idx = np.arange(2 * n)
    f, k = idx // n, idx % n
    sign = np.where(f == 1, -1, 1)
    rot = (k[:, None] + sign[:, None] * k[None, :]) % n
    flip = (f[:, None] + f[None, :]) % 2
    names = [("e" if kk == 0 else f"r^{kk}") if ff == 0 else ("s" if kk == 0 else f"r^{kk} s") for ff, kk in zip(f, k)]
    return FiniteGroup(flip * n + rot, names=names, name=f"D{n}", validate=False)


def _compose_closure(generators: list[tuple[int, ...]], max_order: int) -> list[tuple[int, ...]]:
    degree = len(generators[0])
    identity = tuple(range(degree))
    elements = [identity]
    seen = {identity}
    frontier = [identity]
    while frontier:
        new = []
        for p in frontier:
            for g in generators:
                q = tuple(g[p[i]] for i in range(degree))  # g o p
                if q not in seen:
                    seen.add(q)
                    elements.append(q)
                    new.append(q)
                    if len(elements) > max_order:
                        return elements
        frontier = new
    return elements


def from_permutations(
    generators: Iterable[Sequence[int]], name: str | None = None, max_order: int = MAX_GROUP_ORDER
) -> FiniteGroup:
    """The group generated by permutations of ``0..d-1`` (each given as the image list).

    The product ``g_a g_b`` is composition ``i -> g_a[g_b[i]]`` (apply g_b first). Element 0 is the
    identity.
    """
    gens = [tuple(int(v) for v in g) for g in generators]
    if not gens:
        raise ValueError("from_permutations needs at least one generator")
    degree = len(gens[0])
    for g in gens:
        if len(g) != degree or sorted(g) != list(range(degree)):
            raise ValueError(f"{list(g)} is not a permutation of 0..{degree - 1}")
    elements = _compose_closure(gens, max_order)
    if len(elements) > max_order:
        raise ValueError(f"the generated group has more than {max_order} elements (the supported limit)")
    lookup = {p: i for i, p in enumerate(elements)}
    perms = np.array(elements)
    n = len(elements)
    table = np.empty((n, n), dtype=np.int64)
    for a in range(n):
        composed = perms[a][perms]  # row b: g_a o g_b
        table[a] = [lookup[tuple(row)] for row in composed]
    names = ["e" if i == 0 else "(" + " ".join(map(str, p)) + ")" for i, p in enumerate(elements)]
    return FiniteGroup(table, names=names, name=name or f"Perm{n}", validate=False)


@functools.cache
def symmetric(n: int) -> FiniteGroup:
    """The symmetric group S_n (n <= 5), generated by a transposition and an n-cycle."""
    n = _positive(n, "symmetric group degree")
    if n > 5:
        raise ValueError(f"symmetric(n) supports n <= 5 (order <= 120), got n={n}")
    if n == 1:
        return from_permutations([[0]], name="S1")
    transposition = [1, 0] + list(range(2, n))
    cycle = list(range(1, n)) + [0]
    return from_permutations([transposition, cycle], name=f"S{n}")


def direct_product(g: FiniteGroup, h: FiniteGroup) -> FiniteGroup:
    """``G x H`` with element ``(a, b)`` at index ``a * |H| + b``."""
    ng, nh = g.order, h.order
    check_group_order(ng * nh, f"{g.name}x{h.name}")
    table = (g.table[:, None, :, None] * nh + h.table[None, :, None, :]).reshape(ng * nh, ng * nh)
    names = [f"({a},{b})" for a in g.names for b in h.names]
    shape = g.cyclic_shape + h.cyclic_shape if g.cyclic_shape and h.cyclic_shape else None
    return FiniteGroup(table, names=names, name=f"{g.name}x{h.name}", cyclic_shape=shape, validate=False)


def semidirect_product(
    normal: FiniteGroup,
    acting: FiniteGroup,
    action: np.ndarray | Callable[[int, int], int],
    name: str | None = None,
) -> FiniteGroup:
    """``N x| H`` with ``(n1, h1)(n2, h2) = (n1 phi_{h1}(n2), h1 h2)``; element (n, h) at ``n * |H| + h``.

    ``action`` is an ``(|H|, |N|)`` array with ``action[h, n] = phi_h(n)`` or a callable ``(h, n) ->
    phi_h(n)``. It is checked to be a homomorphism ``H -> Aut(N)``.
    """
    nn_, nh = normal.order, acting.order
    check_group_order(nn_ * nh, name or f"{normal.name}:{acting.name}")
    if callable(action):
        phi = np.array([[action(h, n) for n in range(nn_)] for h in range(nh)], dtype=np.int64)
    else:
        phi = np.asarray(action, dtype=np.int64)
    if phi.shape != (nh, nn_):
        raise ValueError(f"action must have shape (|H|, |N|) = ({nh}, {nn_}), got {phi.shape}")
    for h in range(nh):
        if sorted(phi[h]) != list(range(nn_)):
            raise ValueError(f"action of element {h} is not a bijection of N")
        if not np.array_equal(phi[h][normal.table], normal.table[phi[h][:, None], phi[h][None, :]]):
            raise ValueError(f"action of element {h} is not an automorphism of N")
    composed = phi[:, phi]  # composed[h1, h2, n] = phi_h1(phi_h2(n))
    if not np.array_equal(composed, phi[acting.table]):
        raise ValueError("action is not a homomorphism: phi_{h1 h2} != phi_{h1} o phi_{h2}")
    n_idx = np.arange(nn_ * nh) // nh
    h_idx = np.arange(nn_ * nh) % nh
    new_n = normal.table[n_idx[:, None], phi[h_idx[:, None], n_idx[None, :]]]
    new_h = acting.table[h_idx[:, None], h_idx[None, :]]
    names = [f"({a},{b})" for a in normal.names for b in acting.names]
    return FiniteGroup(new_n * nh + new_h, names=names, name=name or f"{normal.name}:{acting.name}", validate=False)


def _positive(n: int, what: str) -> int:
    if int(n) != n or n < 1:
        raise ValueError(f"{what} must be a positive integer, got {n!r}")
    return int(n)


# ----------------------------------------------------------------------------------------------
# parsing

_FACTOR = re.compile(r"^([CDSZ])([0-9]+)(?:\^([0-9]+))?$")  # ASCII digits only: "C８" is no spec
_MAX_POWER = 64
_READ_DIGITS = 15
"""A spec number with more significant digits is never read as an int (one of 10^8 digits takes minutes): it is
refused by its length alone."""
_ACCEPTED = (
    '"C8" (cyclic), "D4" (dihedral of the square, order 8), "S3" (symmetric, n <= 5), '
    'products with "x" such as "C4xC4" or "D4xC2", powers such as "C2^3", or a FiniteGroup'
)


def group(spec: str | FiniteGroup) -> FiniteGroup:
    """Parse a group spec (``"C8"``, ``"D4"``, ``"S3"``, ``"C4xC4"``, ``"D4xC2"``, ``"C2^3"``).

    A ``FiniteGroup`` passes through unchanged. Unknown specs raise ``ValueError`` listing the
    accepted forms; a spec whose order exceeds :data:`~gmcompress.core.checks.MAX_GROUP_ORDER` is refused before
    anything of its size is computed.
    """
    if isinstance(spec, FiniteGroup):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"unknown group {short_repr(spec)}: expected {_ACCEPTED}")
    return _parse(spec.replace(" ", ""))


def spec_of(g: FiniteGroup) -> str | None:
    """The spec that :func:`group` rebuilds ``g`` from (its name, when that parses to the same table), else None."""
    try:
        return g.name if group(g.name) == g else None
    except ValueError:
        return None


def _factors(spec: str) -> list[tuple[str, int, int]]:
    """``(kind, n, power)`` per factor of a spec, checked, with the whole order within the limit.

    Every number is bounded before any arithmetic on it, so the work does not grow with the numbers."""
    factors, order, quoted = [], 1, short_repr(spec)
    for part in spec.split("x") if spec else [""]:
        m = _FACTOR.match(part)
        if not m:
            raise ValueError(f"unknown group {quoted}: expected {_ACCEPTED}")
        kind, digits, power_digits = m.group(1), m.group(2), m.group(3) or "1"
        n, power = _spec_number(digits), _spec_number(power_digits)
        if n == 0 or power == 0:
            raise ValueError(f"unknown group {quoted}: orders and powers must be positive; expected {_ACCEPTED}")
        if kind == "S" and (n is None or n > 5):
            raise ValueError(f"unknown group {quoted}: symmetric groups need n <= 5; expected {_ACCEPTED}")
        if power is None or power > _MAX_POWER:
            shown = str(power) if power is not None else f"about 10^{len(power_digits.lstrip('0')) - 1}"
            raise ValueError(f"group {quoted}: powers above {_MAX_POWER} are not supported, got {shown}")
        if n is None:
            raise group_order_error(spec, f"about 10^{len(digits.lstrip('0')) - 1}")
        size = math.factorial(n) if kind == "S" else 2 * n if kind == "D" else n
        check_group_order(size, spec)  # size <= MAX_GROUP_ORDER and power <= 64: size**power stays small
        order *= size**power
        check_group_order(order, spec)
        factors.append((kind, n, power))
    return factors


def _spec_number(digits: str) -> int | None:
    """The value of a spec's ASCII digits, or None when it has more than :data:`_READ_DIGITS` significant digits."""
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= _READ_DIGITS else None


@functools.cache
def _parse(spec: str) -> FiniteGroup:
    factors: list[FiniteGroup] = []
    for kind, n, power in _factors(spec):
        base = cyclic(n) if kind in "CZ" else dihedral(n) if kind == "D" else symmetric(n)
        factors.extend([base] * power)
    out = factors[0]
    for f in factors[1:]:
        out = direct_product(out, f)
    if len(factors) > 1:
        out = FiniteGroup(out.table, names=out.names, name=spec, cyclic_shape=out.cyclic_shape, validate=False)
    return out


# ----------------------------------------------------------------------------------------------
# subgroups and cosets


def subgroup(g: FiniteGroup, generators: Iterable[int]) -> np.ndarray:
    """Sorted element indices of the subgroup generated by ``generators``."""
    elems = {g.identity}
    frontier = [g.identity]
    gens = [int(x) for x in generators]
    for x in gens:
        if not 0 <= x < g.order:
            raise ValueError(f"generator {x} is not an element of {g.name} (order {g.order})")
    while frontier:
        new = []
        for a in frontier:
            for x in gens:
                b = int(g.table[a, x])
                if b not in elems:
                    elems.add(b)
                    new.append(b)
        frontier = new
    return np.array(sorted(elems), dtype=np.int64)


def left_cosets(g: FiniteGroup, sub: Iterable[int]) -> np.ndarray:
    """Left cosets ``aH`` of the subgroup with elements ``sub``, shape ``(N / |H|, |H|)``.

    Row ``c`` lists ``a h`` for ``h`` in ``sub`` (in the given order), ``a`` the smallest element
    of the coset; rows are sorted by that representative.
    """
    h = np.asarray(list(sub), dtype=np.int64)
    if set(subgroup(g, h).tolist()) != set(h.tolist()):
        raise ValueError("left_cosets needs the full element list of a subgroup (closed under products)")
    assigned = np.full(g.order, -1)
    rows = []
    for a in range(g.order):
        if assigned[a] < 0:
            row = g.table[a, h]
            assigned[row] = len(rows)
            rows.append(row)
    return np.array(rows, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# real regular basis


@dataclass(frozen=True)
class RegularBasis:
    """A real orthogonal ``Q`` with ``Q^T GM(f) Q`` block-diagonal for every group matrix of G.

    ``blocks`` lists the block sizes in column order; blocks are sorted by size. The block of every group
    diagonal ``B_g`` is computed where it is needed (``gmcompress.core.kernels.block_plan``).
    """

    q: np.ndarray
    blocks: tuple[int, ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(v) for v in np.concatenate([[0], np.cumsum(self.blocks)[:-1]]))


def _is_block_diagonal(g: FiniteGroup, q: np.ndarray, blocks: Sequence[int], tol: float) -> bool:
    mask = np.zeros((g.order, g.order), dtype=bool)
    start = 0
    for d in blocks:
        mask[start : start + d, start : start + d] = True
        start += d
    pattern = g.right_shift_index()
    for x in range(g.order):
        b = (pattern == x).astype(float)
        if np.abs((q.T @ b @ q)[~mask]).max(initial=0.0) > tol:
            return False
    return True


def _fourier_basis(g: FiniteGroup) -> tuple[np.ndarray, list[int]]:
    shape = g.cyclic_shape
    assert shape is not None
    n = g.order
    coords = np.stack(np.unravel_index(np.arange(n), shape), axis=1)  # (N, k)
    freqs = coords  # the dual group has the same shape
    done = np.zeros(n, dtype=bool)
    ones, twos = [], []
    for f in range(n):
        if done[f]:
            continue
        kvec = freqs[f]
        neg = np.ravel_multi_index(tuple((-kvec) % np.array(shape)), shape)
        phase = 2 * np.pi * (coords * (kvec / np.array(shape))).sum(axis=1)
        done[f] = done[neg] = True
        if neg == f:
            ones.append(np.cos(phase) / np.sqrt(n))
        else:
            twos.append(np.stack([np.cos(phase), np.sin(phase)], axis=1) * np.sqrt(2.0 / n))
    cols = ones + [v for pair in twos for v in pair.T]
    return np.stack(cols, axis=1), [1] * len(ones) + [2] * len(twos)


def _commutant_basis(g: FiniteGroup, seed: int) -> tuple[np.ndarray, list[int]]:
    n = g.order
    rng = np.random.default_rng(seed)
    c = np.zeros((n, n))
    coeffs = rng.standard_normal(n)
    for h in range(n):
        lh = g.left_action(h)
        c += coeffs[h] * (lh + lh.T)
    vals, vecs = np.linalg.eigh(c)
    scale = max(1.0, float(np.abs(vals).max()))
    groups: list[list[int]] = [[0]]
    for i in range(1, n):
        if abs(vals[i] - vals[groups[-1][-1]]) <= 1e-7 * scale:
            groups[-1].append(i)
        else:
            groups.append([i])
    groups.sort(key=len)  # stable: by size, then eigenvalue
    order = [i for grp in groups for i in grp]
    return vecs[:, order], [len(grp) for grp in groups]


@functools.lru_cache(maxsize=64)
def regular_basis(g: FiniteGroup) -> RegularBasis:
    """Real orthogonal basis that block-diagonalises every group matrix of ``g`` (cached per group).

    Abelian groups with a cyclic decomposition get the real Fourier basis (1x1 blocks for real
    characters, 2x2 cos/sin blocks for conjugate pairs). Any other group gets the eigenvectors of a
    random symmetric element ``sum_h c_h (L_h + L_h^T)`` of the commutant of the group matrices;
    its eigenspaces are irreducible, so every group matrix is block-diagonal on them. The result is
    verified on every group diagonal ``B_g``.
    """
    if g.cyclic_shape is not None:
        q, blocks = _fourier_basis(g)
        if _is_block_diagonal(g, q, blocks, 1e-10):
            return _frozen(q, blocks)
    for seed in range(10):
        q, blocks = _commutant_basis(g, seed)
        if _is_block_diagonal(g, q, blocks, 1e-10):
            return _frozen(q, blocks)
    raise RuntimeError(f"could not block-diagonalise the regular representation of {g.name}")


def _frozen(q: np.ndarray, blocks: Sequence[int]) -> RegularBasis:
    q = np.ascontiguousarray(q)
    q.setflags(write=False)
    return RegularBasis(q=q, blocks=tuple(int(b) for b in blocks))


def double_coset_ids(g: FiniteGroup, left: Iterable[int], right: Iterable[int]) -> np.ndarray:
    """``(N,)`` id of the double coset ``K g H`` of each element (K = ``left``, H = ``right``), by first element."""
    k = np.asarray(list(left), dtype=np.int64)
    h = np.asarray(list(right), dtype=np.int64)
    ids = np.full(g.order, -1, dtype=np.int64)
    count = 0
    for a in range(g.order):
        if ids[a] < 0:
            ids[g.table[g.table[k, a][:, None], h[None, :]].ravel()] = count
            count += 1
    return ids


# spatial action of the square's symmetry groups on a k x k grid -------------------------------

SQUARE_GROUPS = ("C1", "C2", "C4", "D1", "D2", "D4")
_QUARTER_TURNS = {"C1": 4, "C2": 2, "C4": 1, "D1": 4, "D2": 2, "D4": 1}  # quarter turns per rotation step


def square_group(g: FiniteGroup | str) -> FiniteGroup:
    """``g`` when it is one of the square's symmetry groups :data:`SQUARE_GROUPS`, else a ValueError.

    Recognised by name *and* Cayley table (C2 and D1 share a table; a ``from_table`` group that only
    borrows the name "C4" is refused).
    """
    g = group(g)
    if g.name not in SQUARE_GROUPS or g != group(g.name):
        raise ValueError(f"expected a group of the square {SQUARE_GROUPS} (rotations by 90 degrees, flips), got {g!r}")
    return g


def square_element(g: FiniteGroup, h: int) -> tuple[bool, int]:
    """Element ``h`` of a square group as ``(flip, quarter_turns)``: first flip left-right, then rotate.

    Cyclic groups number rotations ``r^k`` as k; dihedral ones ``r^k s^f`` as ``f * n_rot + k``
    (see :func:`dihedral`).
    """
    step = _QUARTER_TURNS[square_group(g).name]
    n_rot = 4 // step
    flip, rot = divmod(int(h), n_rot) if g.name.startswith("D") else (0, int(h))
    return bool(flip), rot * step


def grid_action(g: FiniteGroup | str, size: int) -> np.ndarray:
    """Pixel permutations of a ``size x size`` grid for a group of the square (C1, C2, C4, D1, D2, D4).

    Returns ``perm`` of shape ``(|H|, size * size)`` with ``(h . img).ravel() == img.ravel()[perm[h]]``,
    the same transform as ``torch.rot90(img, k, dims=(-2, -1))`` after ``torch.flip(img, dims=(-1,))``
    for ``h = r^k s^f`` (:func:`square_element`). C2 is the half turn, D1 the single flip, D2 half turn
    and flip.
    """
    g = square_group(g)
    base = np.arange(size * size).reshape(size, size)
    perms = []
    for idx in range(g.order):
        flip, quarter_turns = square_element(g, idx)
        img = np.flip(base, axis=-1) if flip else base
        perms.append(np.rot90(img, quarter_turns, axes=(-2, -1)).ravel())
    perm = np.stack(perms)
    # the map h -> permutation must be a homomorphism: (g_a g_b) . img == g_a . (g_b . img)
    for a in range(g.order):
        for b in range(g.order):
            if not np.array_equal(perm[g.table[a, b]], perm[b][perm[a]]):
                raise AssertionError(f"grid action of {g.name} is not a homomorphism")  # pragma: no cover
    return perm
