import io

import numpy as np
import pytest
import torch
from torch import nn

import gmcompress as gm
from gmcompress.core.patterns import conv_pattern
from gmcompress.fit.reference import project_pattern
from gmcompress.nn import GMChannelConv, GMConv2d, GMLinear, GMPool, transform_feature_map
from gmcompress.nn.functional import spectrum_map

GROUPS = ["C8", "D4", "S3", "C4xC4", "C2^3"]


def paths(spec):
    return GMLinear(gm.group(spec).order, gm.group(spec).order, spec).impls()


def make_linear(spec, rank, impl, support=None, seed=0, dtype=torch.float32):
    n = gm.group(spec).order
    torch.manual_seed(seed)
    layer = GMLinear(3 * n, 2 * n, spec, rank=rank, support=support, impl=impl, dtype=dtype)
    with torch.no_grad():
        if layer.modulations is not None:
            layer.modulations.normal_()
    return layer


def kernel_grad(layer, grad):
    """The gradient with respect to the kernels, from ``grad`` with respect to the stored parameter: for a spectrum
    ``S = T K`` (see GMModule), ``dL/dK = T^T dL/dS``."""
    if layer.stored_form == "kernels":
        return grad
    return layer._spectrum_to_kernels(grad, layer._to_spectrum.t().to(grad.dtype))


@pytest.mark.parametrize("spec", GROUPS)
@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("restricted", [False, True])
def test_every_path_equals_the_dense_materialisation(spec, rank, restricted):
    n = gm.group(spec).order
    support = [0, 1, n - 1] if restricted else None
    reference = make_linear(spec, rank, "dense", support)
    x = torch.randn(2, 5, 3 * n, requires_grad=True)  # leading dims like nn.Linear
    # independent reference: x @ W^T + b with W built from the definition in numpy
    fit_like = gm.structure.relaxed_dense(
        reference.kernels.detach().double().numpy(),
        reference.modulations.detach().double().numpy(),
        gm.structure.resolve_support(reference.pattern, support),
        reference.pattern,
    )
    expected = x.detach().double() @ torch.from_numpy(fit_like).T + reference.bias.detach().double()
    for impl in paths(spec):
        layer = make_linear(spec, rank, impl, support)
        layer.load_state_dict(reference.state_dict())
        y = layer(x)
        assert y.shape == (2, 5, 2 * n)
        torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(y.square().sum(), [x, layer._free(), layer.modulations, layer.bias])
        grads = (grads[0], kernel_grad(layer, grads[1]), *grads[2:])
        ref_y = reference(x)
        ref_grads = torch.autograd.grad(
            ref_y.square().sum(), [x, reference.kernels, reference.modulations, reference.bias]
        )
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec,impl", [(spec, impl) for spec in ["C8", "D4", "C4xC4"] for impl in paths(spec)])
def test_gradcheck_float64(spec, impl):
    layer = make_linear(spec, 2, impl, dtype=torch.float64)
    n = gm.group(spec).order
    x = torch.randn(3, 3 * n, dtype=torch.float64, requires_grad=True)

    def fn(x, k, a, b):
        return torch.func.functional_call(layer, {layer.stored_form: k, "modulations": a, "bias": b}, (x,))

    params = [p.detach().clone().requires_grad_() for p in (layer._free(), layer.modulations, layer.bias)]
    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("spec", GROUPS)
@pytest.mark.parametrize("rank,modulate", [(1, False), (1, True), (3, True)])
def test_from_dense_reproduces_project(spec, rank, modulate):
    n = gm.group(spec).order
    torch.manual_seed(1)
    linear = nn.Linear(2 * n, 3 * n, dtype=torch.float64)
    layer = GMLinear.from_dense(linear, spec, rank=rank, modulate=modulate)
    fit = gm.structure.project(linear.weight.detach().numpy(), spec, rank=rank, modulate=modulate)
    np.testing.assert_allclose(layer.weight.detach().numpy(), fit.dense(), rtol=0, atol=1e-13)
    assert layer.fit_error == fit.relative_error
    assert torch.equal(layer.bias, linear.bias)
    dense = layer.to_dense()
    x = torch.randn(4, 2 * n, dtype=torch.float64)
    torch.testing.assert_close(dense(x), layer(x))


def test_full_rank_from_dense_is_lossless():
    linear = nn.Linear(16, 24)
    layer = GMLinear.from_dense(linear, "C8", rank=8)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)


def test_translation_equivariance_on_the_pixel_torus():
    """A GM over C4 x C6 is a circular convolution: rolling the image rolls the output."""
    layer = GMLinear(2 * 24, 3 * 24, "C4xC6", modulate=False, bias="shared")
    x = torch.randn(5, 2, 4, 6)
    y = layer(x.reshape(5, -1)).reshape(5, 3, 4, 6)
    for shift in [(1, 0), (0, 1), (3, 5)]:
        rolled = layer(torch.roll(x, shift, dims=(-2, -1)).reshape(5, -1)).reshape(5, 3, 4, 6)
        torch.testing.assert_close(rolled, torch.roll(y, shift, dims=(-2, -1)), atol=1e-5, rtol=1e-5)
    assert layer.check_equivariance() < 1e-5
    relaxed = GMLinear(2 * 24, 3 * 24, "C4xC6", rank=2)
    with torch.no_grad():
        relaxed.modulations.normal_()
    assert relaxed.check_equivariance() > 1e-2  # modulated: only approximately equivariant


def test_exact_gm_equivariance_for_nonabelian_groups():
    for spec in ["D4", "S3", "D4xC2"]:
        layer = GMLinear(2 * gm.group(spec).order, gm.group(spec).order, spec, modulate=False, bias=False)
        assert layer.check_equivariance() < 1e-5, spec


def torus_rotation_group(n):
    """(C_n x C_n) x| C4, C4 rotating the torus about pixel (0, 0): (a, b) -> (-b, a)."""
    torus = gm.group(f"C{n}xC{n}")

    def act(h, p):
        a, b = divmod(p, n)
        for _ in range(h):
            a, b = (-b) % n, a
        return a * n + b

    return gm.groups.semidirect_product(torus, gm.groups.cyclic(4), act)


def rotate_torus(img):
    """Rotate an (..., n, n) image by 90 degrees about pixel (0, 0) of the torus: out[i, j] = in[j, -i]."""
    return torch.roll(torch.rot90(img, 1, dims=(-2, -1)), 1, dims=-2)


def test_homogeneous_space_rotation_and_translation_equivariance():
    n = 5
    g = torus_rotation_group(n)
    rotations = list(range(4))  # elements (0, h): index 0 * 4 + h
    layer = GMLinear(
        2 * n * n, 3 * n * n, g, modulate=False, bias="shared", in_subgroup=rotations, out_subgroup=rotations
    )
    # kernels live on rotation orbits of pixel offsets: (n^2 - 1) / 4 + 1 of them
    assert layer.kernels.shape[-1] == (n * n - 1) // 4 + 1
    x = torch.randn(4, 2, n, n)
    y = layer(x.reshape(4, -1)).reshape(4, 3, n, n)
    y_rot = layer(rotate_torus(x).reshape(4, -1)).reshape(4, 3, n, n)
    torch.testing.assert_close(y_rot, rotate_torus(y), atol=1e-5, rtol=1e-5)
    y_shift = layer(torch.roll(x, (2, 1), dims=(-2, -1)).reshape(4, -1)).reshape(4, 3, n, n)
    torch.testing.assert_close(y_shift, torch.roll(y, (2, 1), dims=(-2, -1)), atol=1e-5, rtol=1e-5)
    assert layer.check_equivariance() < 1e-5


def test_homogeneous_projection_is_least_squares():
    """The exact coset-space fit equals the mean over each double-coset class (computed here by loops)."""
    n = 3
    g = torus_rotation_group(n)
    rot = [0, 1, 2, 3]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n * n, n * n))
    fit = gm.structure.project(w, g, modulate=False, in_subgroup=rot, out_subgroup=rot)

    # class of (p, q): rotation orbit of the offset q - p
    def orbit(offset):
        a, b = divmod(offset, n)
        pts = set()
        for _ in range(4):
            pts.add(a * n + b)
            a, b = (-b) % n, a
        return min(pts)

    cls = np.array(
        [[orbit(((q // n - p // n) % n) * n + (q % n - p % n) % n) for q in range(n * n)] for p in range(n * n)]
    )
    expected = np.zeros_like(w)
    for c in np.unique(cls):
        expected[cls == c] = w[cls == c].mean()
    np.testing.assert_allclose(fit.dense(), expected, atol=1e-12)
    layer = GMLinear.from_dense(
        nn.Linear(n * n, n * n, dtype=torch.float64),
        g,
        modulate=False,
        in_subgroup=rot,
        out_subgroup=rot,
        bias="shared",
    )
    assert layer.check_equivariance(torch.randn(3, n * n, dtype=torch.float64)) < 1e-12


@pytest.mark.parametrize("spec", ["C2", "C4", "D2", "D4"])
@pytest.mark.parametrize("lifting", [True, False])
def test_exact_group_conv_is_equivariant_to_real_rotations(spec, lifting):
    n = gm.group(spec).order
    torch.manual_seed(0)
    conv = GMConv2d(
        3 if lifting else 2 * n,
        2 * n,
        3,
        spec,
        modulate=False,
        padding=1,
        bias="shared",
        lifting=lifting,
        dtype=torch.float64,
    )
    x = torch.randn(2, conv.in_channels, 9, 9, dtype=torch.float64)
    y = conv(x)
    for h in range(n):
        # the image really rotated (torch.rot90/flip), fibres permuted
        hx = transform_feature_map(x, conv.group, h, fibred=not lifting)
        torch.testing.assert_close(conv(hx), transform_feature_map(y, conv.group, h, fibred=True))
    assert conv.check_equivariance() < 1e-12


def test_c4_rotation_by_hand():
    """Independent of transform_feature_map: rot90 + cyclic shift of the 4 orientation channels."""
    torch.manual_seed(0)
    conv = GMConv2d(4, 4, 3, "C4", modulate=False, padding=1, bias=False, dtype=torch.float64)
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    hx = torch.rot90(x, 1, dims=(-2, -1))[:, [3, 0, 1, 2]]  # new[h'] = old[h' - 1]
    hy = torch.rot90(conv(x), 1, dims=(-2, -1))[:, [3, 0, 1, 2]]
    torch.testing.assert_close(conv(hx), hy)


@pytest.mark.parametrize("spec", ["C4", "D4"])
@pytest.mark.parametrize("lifting", [True, False])
def test_conv_from_dense(spec, lifting):
    n = gm.group(spec).order
    torch.manual_seed(0)
    dense = nn.Conv2d(3 if lifting else 2 * n, 2 * n, 3, padding=1, stride=2, dtype=torch.float64)
    x = torch.randn(2, dense.in_channels, 8, 8, dtype=torch.float64)
    full = GMConv2d.from_dense(dense, spec, rank=n, lifting=lifting)
    torch.testing.assert_close(full(x), dense(x))  # rank |H| reproduces any convolution
    exact = GMConv2d.from_dense(dense, spec, modulate=False, lifting=lifting)
    fit = project_pattern(
        dense.weight.detach().numpy().reshape(2 * n, -1), conv_pattern(gm.group(spec), 3, lifting), modulate=False
    )
    np.testing.assert_allclose(exact.weight.detach().numpy().reshape(2 * n, -1), fit.dense(), atol=1e-13)
    assert exact.to_dense()(x).sub(exact(x)).abs().max() < 1e-12


def test_pointwise_conv_is_gmlinear_per_pixel():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 1)
    pw = GMChannelConv.from_dense(conv, "C8", rank=2)
    linear = nn.Linear(16, 24)
    linear.weight.data, linear.bias.data = conv.weight.data.view(24, 16), conv.bias.data
    gml = GMLinear.from_dense(linear, "C8", rank=2)
    x = torch.randn(2, 16, 5, 5)
    expected = gml(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(pw(x), expected, atol=1e-5, rtol=1e-5)
    full = GMChannelConv.from_dense(conv, "C8", rank=8)
    torch.testing.assert_close(full(x), conv(x), atol=1e-5, rtol=1e-5)


def test_pooling():
    g = gm.group("C4xC6")
    pool = GMPool.stride(g, 2)
    x = torch.randn(3, 2, 4, 6)
    expected = nn.functional.max_pool2d(x, 2)
    torch.testing.assert_close(pool(x.reshape(3, -1)).reshape(3, 2, 2, 3), expected)
    mean = GMPool.stride(g, 2, mode="mean")
    torch.testing.assert_close(mean(x.reshape(3, -1)).reshape(3, 2, 2, 3), nn.functional.avg_pool2d(x, 2))
    # pooling a whole fibre gives an invariant
    d4 = gm.group("D4")
    inv = GMPool.cosets(d4)
    layer = GMLinear(16, 16, d4, modulate=False, bias="shared")
    feats = torch.randn(5, 16)
    for h in range(8):
        moved = feats.view(5, 2, 8)[..., layer.group_action(h)].reshape(5, 16)
        torch.testing.assert_close(inv(layer(moved)), inv(layer(feats)), atol=1e-6, rtol=1e-6)
    # cosets of the rotation subgroup of D4: 2 cells (rotations, reflections)
    assert GMPool.cosets(d4, [1]).n_out == 2


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match=r"GMLinear\(100, 64\).*out=64, in=100.*multiple of 8.*pad"):
        GMLinear(100, 64, "C8")
    padded = GMLinear(100, 60, "C8", pad=True)
    assert padded(torch.randn(2, 100)).shape == (2, 60)
    with pytest.raises(ValueError, match="impl"):
        GMLinear(16, 16, "C8", impl="cuda")
    with pytest.raises(ValueError, match="fft.*D4"):
        GMLinear(16, 16, "D4", impl="fft")
    with pytest.raises(ValueError, match="in_channels must be a multiple of .H.=4.*lifting"):
        GMConv2d(6, 8, 3, "C4")
    with pytest.raises(ValueError, match="group of the square"):
        GMConv2d(8, 8, 3, "C8")
    bad = nn.Linear(16, 16)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"fc\(16, 16\).*NaN"):
        GMLinear.from_dense(bad, "C8", name="fc")


def test_padded_layer_matches_its_dense_form():
    linear = nn.Linear(100, 60)
    layer = GMLinear.from_dense(linear, "C8", rank=8, pad=True)
    x = torch.randn(4, 100)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)  # full rank: lossless even padded
    torch.testing.assert_close(layer.to_dense()(x), layer(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda: make_linear("C8", 2, "blocks"),
        lambda: GMConv2d(8, 8, 3, "C4", rank=2, padding=1),
        lambda: GMLinear(25 * 3, 25 * 2, torus_rotation_group(5), in_subgroup=[0, 1, 2, 3], out_subgroup=[0, 1, 2, 3]),
    ],
)
def test_state_dict_round_trip_is_bit_exact(make):
    layer = make()
    keys_train = set(layer.train().state_dict())
    keys_eval = set(layer.eval().state_dict())
    assert keys_train == keys_eval
    assert all(not k.startswith("_") for k in keys_train)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = make()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k])
    x = torch.randn(2, 8, 6, 6) if isinstance(layer, GMConv2d) else torch.randn(2, layer.in_features)
    assert torch.equal(layer(x), fresh(x))


def test_dtype_round_trip_keeps_constants_exact():
    layer = make_linear("D4", 2, "blocks")
    q = layer._q_in.clone()
    layer.half().float()
    assert torch.equal(layer._q_in, q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["dense", "blocks", "fft"])
@pytest.mark.parametrize("spec", ["C8", "D4"])
def test_low_precision(dtype, impl, spec):
    """Forward and gradients in half precision against the float32 dense path (tolerances of the format)."""
    if impl not in paths(spec):
        pytest.skip(f"{spec} has no {impl} path")
    n = gm.group(spec).order
    ref = make_linear(spec, 2, "dense")
    layer = make_linear(spec, 2, impl)
    layer.load_state_dict(ref.state_dict())
    layer.to(dtype)
    x = torch.randn(4, 3 * n)
    xl = x.to(dtype).requires_grad_()
    y = layer(xl)
    assert y.dtype == dtype
    ref_x = x.clone().requires_grad_()
    ref_y = ref(ref_x)
    torch.testing.assert_close(y.float(), ref_y, atol=5e-2, rtol=5e-2)
    grads = torch.autograd.grad(y.float().square().sum(), [xl, layer._free(), layer.modulations, layer.bias])
    grads = (grads[0], kernel_grad(layer, grads[1]), *grads[2:])
    ref_grads = torch.autograd.grad(ref_y.square().sum(), [ref_x, ref.kernels, ref.modulations, ref.bias])
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        scale = want.abs().max()
        torch.testing.assert_close(got.float() / scale, want / scale, atol=4e-2, rtol=0)


@pytest.mark.parametrize("spec", GROUPS)
@pytest.mark.parametrize(
    "rank,modulate,bias", [(1, False, True), (1, True, "shared"), (3, True, False), (2, True, True)]
)
def test_inference_paths_equal_the_definition(spec, rank, modulate, bias):
    """Eval mode under inference_mode (cached weights, no autograd: the deployment path) on every path."""
    n = gm.group(spec).order
    torch.manual_seed(1)
    ref = GMLinear(3 * n, 5 * n, spec, rank=rank, modulate=modulate, bias=bias, impl="dense")
    with torch.no_grad():
        if ref.modulations is not None:
            ref.modulations.normal_()
    w = gm.structure.relaxed_dense(
        ref.kernels.detach().double().numpy(),
        np.ones((1, 5, n)) if ref.modulations is None else ref.modulations.detach().double().numpy(),
        gm.structure.resolve_support(ref.pattern, None),
        ref.pattern,
    )
    x = torch.randn(7, 3 * n)
    b = 0 if ref.bias is None else gm.nn.base.expand_bias(ref.bias, 5 * n, n).detach().double()
    expected = x.double() @ torch.from_numpy(w).T + b
    for impl in paths(spec):
        layer = GMLinear(3 * n, 5 * n, spec, rank=rank, modulate=modulate, bias=bias, impl=impl).eval()
        layer.load_state_dict(ref.state_dict())
        with torch.inference_mode():
            for _ in range(2):  # the second call is served from the cache
                torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_extra_repr_shows_structure():
    text = repr(GMLinear(64, 64, "C16", rank=2))
    assert "group=C16" in text and "rank=2" in text and "compression=" in text


def test_torch_export_blocks_path():
    layer = make_linear("D4", 2, "blocks").eval()
    x = torch.randn(4, 24)
    program = torch.export.export(layer, (x,))
    torch.testing.assert_close(program.module()(x), layer(x))


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["dense", "blocks"])
def test_torch_compile_fullgraph(impl):
    layer = make_linear("C8", 2, impl)
    x = torch.randn(4, 24)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    compiled(x).sum().backward()
    conv = GMConv2d(8, 8, 3, "C4", rank=2, padding=1)
    xc = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(torch.compile(conv, fullgraph=True)(xc), conv(xc))


def test_torch_compile_under_inference_mode():
    """Deployment compiles in inference mode. A forward that read a numpy array's shape (the pattern's sizes) made
    dynamo guard on the array, and that guard failed on its own frame under inference_mode."""
    layers = [
        (make_linear("C8", 2, "blocks").eval(), torch.randn(4, 24)),
        (GMLinear(64, 64, "C8").eval(), torch.randn(4, 64)),  # "auto": the rule counts the paths' multiply-adds
        (GMChannelConv(16, 16, 3, group="C8", padding=1).eval(), torch.randn(2, 16, 6, 6)),
        (GMConv2d(8, 8, 3, "C4", rank=2, padding=1).eval(), torch.randn(2, 8, 6, 6)),
    ]
    for layer, x in layers:
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        with torch.inference_mode():
            torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize(
    "spec,products", [("C8", 11), ("C16", 23), ("C4xC4", 22), ("C2^3", 8), ("D8", None), ("S3", None)]
)
def test_block_products_use_gauss_for_abelian_groups(spec, products):
    """Abelian groups: one width-1 product per 1x1 block and three per complex-type 2x2 block (Gauss);
    the others keep the packed blocks. Either way q_in, the products and q_out give back the group matrix."""
    from gmcompress.nn.functional import product_plan, product_weights

    g = gm.group(spec)
    plan = product_plan(g)
    assert (plan.groups if plan.parts is not None else None) == products
    layer = make_linear(spec, 2, "blocks")
    w = product_weights(layer.kernels, [getattr(layer, f"_rho{i}") for i in range(layer._n_rho)], plan)
    n, size = g.order, plan.size
    c_in, rco = layer.c_in, layer.rank * layer.c_out
    # the map x -> y without modulations, term by term, from the plan's pieces alone
    x = torch.randn(3, c_in, n, dtype=torch.float64)
    z = torch.einsum("nm,bin->bmi", torch.from_numpy(plan.q_in), x).reshape(3, plan.groups, size * c_in)
    t = torch.einsum("bgj,gjc->bgc", z, w.double()).reshape(3, -1, rco)
    u = torch.einsum("pm,bmc->bcp", torch.from_numpy(plan.q_out), t).reshape(3, layer.rank, layer.c_out, n)
    dense = torch.from_numpy(
        gm.structure.relaxed_dense(
            layer.kernels.detach().double().numpy()[:1], np.ones((1, layer.c_out, n)),
            gm.structure.resolve_support(layer.pattern, None), layer.pattern,
        )
    )  # fmt: skip
    torch.testing.assert_close(u[:, 0].reshape(3, -1), x.reshape(3, -1) @ dense.T)


def test_gmlinear_path_set_after_construction_is_checked():
    """ "packed" without Gauss's form is the blocks path; a path the layer does not have is an error."""
    layer = GMLinear(16, 16, "D4").eval()
    layer.impl = "packed"
    assert layer.resolved_impl() == "blocks"
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no path 'fft'.*'blocks'"):
        layer.impl = "fft"  # D4 is not cyclic
    assert layer.impl == "packed"
    assert GMLinear(16, 16, "C8")(torch.randn(0, 16)).shape == (0, 16)


@pytest.mark.parametrize("impl", ["dense", "blocks", "packed", "fft", "auto"])
@pytest.mark.parametrize(("spec", "out", "pad"), [("C8", 37, True), ("C8", 32, False), ("C2", 32, False)])
def test_an_empty_batch_gives_an_empty_output_on_every_path(impl, spec, out, pad):
    """Padded outputs too, and the unpadded layers whose block path forward takes its short way (C2: no 2x2 blocks,
    Gauss's products at every batch)."""
    layer = GMLinear(64, out, spec, rank=2, impl=impl, pad=pad)
    for shape in [(0, 64), (2, 0, 64)]:
        x = torch.randn(*shape, requires_grad=True)
        y = layer(x)
        assert y.shape == (*shape[:-1], out)
        y.sum().backward()
        assert x.grad.shape == x.shape


def _ops_of_one_call(layer: nn.Module, x: torch.Tensor) -> set:
    """The torch functions one forward call runs."""
    seen = set()

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.add(func)
            return func(*args, **(kwargs or {}))

    with Watch(), torch.no_grad():
        layer(x)
    return seen


@pytest.mark.parametrize("make", [lambda: GMLinear(64, 64, "C8"), lambda: GMChannelConv(16, 16, 1, "C8")])
def test_the_path_forward_takes_follows_every_change_of_impl_and_batch_paths(make):
    """forward reads a path settled when the configuration changes (not resolved on each call): after every change
    of ``impl`` or ``batch_paths``, a state_dict load, a dtype move and a pickle round trip it takes the path asked."""
    layer = make()
    dense_op = torch.nn.functional.linear if isinstance(layer, GMLinear) else torch.nn.functional.conv2d
    small, large = (torch.randn(1, 64), torch.randn(64, 64)) if isinstance(layer, GMLinear) else (
        torch.randn(1, 16, 3, 3), torch.randn(8, 16, 3, 3))  # fmt: skip
    block = "blocks" if isinstance(layer, GMLinear) else "grouped"

    def dense_at(x: torch.Tensor) -> bool:
        return dense_op in _ops_of_one_call(layer, x)

    layer.impl = "dense"
    assert dense_at(small) and dense_at(large)
    layer.impl = block
    assert not dense_at(small) and not dense_at(large)
    layer.impl = "auto"
    layer.batch_paths = {1: "dense", large.shape[0]: block}
    assert dense_at(small) and not dense_at(large)
    layer.batch_paths = {1: block, large.shape[0]: "dense"}
    assert not dense_at(small) and dense_at(large)
    layer.load_state_dict(layer.state_dict())
    layer = layer.double().float()
    assert not dense_at(small) and dense_at(large)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    layer = torch.load(buffer, weights_only=False)
    assert not dense_at(small) and dense_at(large)
    layer.batch_paths = {}
    layer.impl = "dense"
    assert dense_at(small) and dense_at(large)


def test_a_move_settles_the_path_again(monkeypatch):
    """The "auto" rule resolves by device (dense on CUDA); the path is settled again on every ``.to()``. A stand-in
    rule that reads the dtype shows it on a CPU-only machine."""
    by_dtype = lambda self: "dense" if self._free().dtype == torch.float64 else "blocks"  # noqa: E731
    monkeypatch.setattr(GMLinear, "resolved_impl", by_dtype)
    layer = GMLinear(64, 64, "C8", impl="auto")
    assert torch.nn.functional.linear not in _ops_of_one_call(layer, torch.randn(2, 64))
    layer.double()
    assert torch.nn.functional.linear in _ops_of_one_call(layer, torch.randn(2, 64, dtype=torch.float64))


# ---------------------------------------------------------------- block path at few rows: the spectrum read directly
@pytest.mark.parametrize(("spec", "rank"), [("C8", 1), ("C8", 2), ("C4", 3), ("C16", 2), ("C4xC2", 1), ("C3", 1)])
def test_the_block_path_at_few_rows_multiplies_by_the_stored_spectrum_and_matches_gauss(spec, rank, monkeypatch):
    """Up to DIRECT_ROWS rows the block path runs direct_forward on the spectrum parameter (four products a 2x2
    block, nothing derived); outputs and gradients equal Gauss's three-product form (forced by DIRECT_ROWS = 0) and
    the plain product with the dense weight, with padding, rank and modulations."""
    import gmcompress.nn.linear as linear_module

    n = gm.group(spec).order
    torch.manual_seed(0)
    layer = GMLinear(3 * n + 1, 2 * n + 3, spec, rank=rank, impl="blocks", pad=True)
    with torch.no_grad():
        if layer.modulations is not None:
            layer.modulations.uniform_(0.5, 1.5)
    for rows in (1, 5, linear_module.DIRECT_ROWS):
        x = torch.randn(rows, 3 * n + 1, requires_grad=True)
        assert layer.reads_spectrum(rows) and not layer.reads_spectrum(linear_module.DIRECT_ROWS + 1)
        y = layer(x)
        torch.testing.assert_close(y, layer.to_dense()(x), atol=1e-5, rtol=1e-4)
        grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
        with monkeypatch.context() as patch:
            patch.setattr(linear_module, "DIRECT_ROWS", 0)
            assert not layer.reads_spectrum(rows)
            gauss = layer(x)
            gauss_grads = torch.autograd.grad(gauss.square().sum(), [x, *layer.parameters()])
        torch.testing.assert_close(y, gauss, atol=1e-5, rtol=1e-4)
        for g, h in zip(grads, gauss_grads):
            torch.testing.assert_close(g, h, atol=1e-4, rtol=1e-4)


def _bmm_weights_of_one_call(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """One forward call's output and the data pointers of the right-hand sides of every ``bmm`` it runs."""
    seen = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.bmm:
                seen.append(args[1].data_ptr())
            return func(*args, **(kwargs or {}))

    with Watch():
        y = layer(x)
    return y, seen


@pytest.mark.parametrize(("spec", "rank"), [("C8", 1), ("C8", 2), ("C4", 3), ("C16", 2), ("C4xC2", 1), ("C3", 1)])
def test_gauss_products_without_autograd_multiply_the_stored_spectrum_where_it_lies(spec, rank):
    """Above DIRECT_ROWS rows and with nothing to record, Gauss's first N products multiply the spectrum parameter
    itself (its storage) and the rest P + Q; outputs equal the autograd form (one bmm on the concatenated weights)
    and the product with the dense weight, with rank, modulations and leading dims."""
    import gmcompress.nn.linear as linear_module

    n = gm.group(spec).order
    torch.manual_seed(0)
    layer = GMLinear(3 * n, 2 * n, spec, rank=rank, impl="blocks")
    with torch.no_grad():
        if layer.modulations is not None:
            layer.modulations.uniform_(0.5, 1.5)
    x = torch.randn(2, linear_module.DIRECT_ROWS + 3, 3 * n)
    with torch.no_grad():
        fast, seen = _bmm_weights_of_one_call(layer, x)
    assert seen[0] == layer.spectrum.data_ptr() and len(seen) == 2
    recorded = layer(x)  # autograd: one bmm on the concatenated weights
    assert recorded.requires_grad
    torch.testing.assert_close(fast, recorded.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, layer.to_dense()(x).detach(), atol=1e-5, rtol=1e-4)


def test_the_direct_block_products_read_the_spectrum_parameter_itself():
    """No weight is derived on the direct form: the only tensor the block product multiplies by is the stored
    spectrum (its storage), and D4 (2x2 blocks of another type) and kernels-stored layers keep Gauss's or the
    packed form."""
    layer = GMLinear(64, 64, "C8", impl="blocks").eval()
    with torch.no_grad():
        _, seen = _bmm_weights_of_one_call(layer, torch.randn(2, 64))
    assert seen == [layer.spectrum.data_ptr()]
    assert not GMLinear(64, 64, "D4", impl="blocks").reads_spectrum(1)
    assert not GMLinear(64, 64, "C8", impl="dense").reads_spectrum(1)  # stored as kernels


# ---------------------------------------------------------------- no cache: forward reads the live parameters
def layer_cases():
    """(id, builder, input) for every path of GMLinear (abelian and not, a stencil), GMChannelConv and GMConv2d."""
    cases = []
    for spec, support in (("C8", None), ("D4", None), ("C8", [0, 1, 7])):
        for impl in paths(spec):
            tag = f"linear-{spec}{'-stencil' if support else ''}-{impl}"
            cases.append((tag, lambda s=spec, i=impl, k=support: make_linear(s, 2, i, k), (4, 24)))
    for impl in ("dense", "grouped", "packed"):
        for k, shape in ((3, (2, 16, 6, 6)), (1, (2, 16, 5, 5))):
            build = lambda i=impl, k=k: GMChannelConv(16, 24, k, "C8", rank=2, impl=i)  # noqa: E731
            cases.append((f"channel{k}x{k}-C8-{impl}", build, shape))
    cases.append(("conv-C4", lambda: GMConv2d(8, 8, 3, "C4", rank=2, padding=1), (2, 8, 6, 6)))
    return cases


CASES = layer_cases()


def case_ids():
    return [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=case_ids())
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_change_undone_in_an_evaluation_loop_is_seen(case, mode):
    """The careless user's inference loop: a parameter scaled in place between calls, then scaled back; every call
    gives the live weights' output (a cache validated once per block served the old weights)."""
    _, build, shape = case
    torch.manual_seed(0)
    layer = build().eval()
    x = torch.randn(shape)
    structure = layer._free()
    with mode():
        y0 = layer(x)
        structure.mul_(2)
        y1 = layer(x)
        structure.div_(2)
        y2 = layer(x)
    bias = 0 if layer.bias is None else layer(torch.zeros(shape)).detach()  # the bias alone (zero input)
    torch.testing.assert_close(y1 - bias, 2 * (y0 - bias), atol=1e-5, rtol=1e-5)
    assert torch.equal(y2, y0)  # x2 then /2 is exact in binary


@pytest.mark.parametrize("case", CASES, ids=case_ids())
def test_the_ema_swap_pattern_evaluates_the_ema_weights(case):
    """Load an EMA state_dict, evaluate, load the saved weights back: the evaluation used the EMA weights and the
    next one the saved weights, exactly as a fresh layer holding each gives."""
    _, build, shape = case
    torch.manual_seed(0)
    layer, ema = build().eval(), build().eval()
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(shape)
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.inference_mode():
        before = layer(x)
        layer.load_state_dict(ema.state_dict())
        during = layer(x)
        layer.load_state_dict(saved)
        after = layer(x)
        assert torch.equal(during, ema(x))
        assert torch.equal(after, before)


def stacked_call(layer, x, copies=3):
    """``vmap`` of ``functional_call`` over ``copies`` perturbed copies of the parameters, and the loop of single
    calls it must equal."""
    params = {k: v.detach() for k, v in layer.named_parameters()}
    torch.manual_seed(1)
    stacked = {k: torch.stack([v + 0.05 * i * torch.randn_like(v) for i in range(copies)]) for k, v in params.items()}

    def one(p, inp):
        return torch.func.functional_call(layer, p, (inp,))

    batched = torch.vmap(one, in_dims=(0, None))(stacked, x)
    loop = torch.stack([one({k: v[i] for k, v in stacked.items()}, x) for i in range(copies)])
    return batched, loop


@pytest.mark.parametrize("case", CASES, ids=case_ids())
@pytest.mark.parametrize("mode", [torch.no_grad, torch.enable_grad])
def test_vmap_over_stacked_parameters_equals_the_loop(case, mode):
    _, build, shape = case
    torch.manual_seed(0)
    layer = build().eval()
    x = torch.randn(shape)
    with mode():
        batched, loop = stacked_call(layer, x)
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if "stencil" not in c[0]], ids=lambda c: c[0])
@pytest.mark.parametrize("training,grad", [(False, False), (False, True), (True, True)])
def test_compiles_to_one_graph_and_never_recompiles(case, training, grad):
    """``torch.compile(fullgraph=True)`` (a graph break would raise) and two more calls with changed parameters:
    one compilation (the counter of frames compiled stays at one), the live weights' output every time."""
    from torch._dynamo.testing import CompileCounter

    _, build, shape = case
    torch.manual_seed(0)
    layer = build().train(training)
    x = torch.randn(shape)
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    torch._dynamo.reset()
    try:
        for scale in (1.0, 2.0, 0.5):
            with torch.no_grad():
                layer._free().mul_(scale)
            with torch.set_grad_enabled(grad):
                torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1


SPECTRAL = [("linear", "C8", ("blocks", "packed")), ("linear", "C4xC4", ("blocks", "packed")),
            ("channel", "C8", ("grouped", "packed"))]  # fmt: skip


def spectral_layer(kind, spec, impl, **kwargs):
    n = gm.group(spec).order
    if kind == "linear":
        return GMLinear(2 * n, 3 * n, spec, impl=impl, **kwargs), torch.randn(5, 2 * n, dtype=torch.float64)
    return GMChannelConv(2 * n, 3 * n, 3, spec, impl=impl, padding=1, **kwargs), torch.randn(2, 2 * n, 5, 5)


@pytest.mark.parametrize("kind,spec,block_paths", SPECTRAL)
def test_a_path_change_converts_the_stored_kernels_and_back(kind, spec, block_paths):
    """dense -> block path -> other paths -> dense: the kernels are stored as their block coordinates on a block
    path (the state_dict says so), every conversion keeps the function (same to_dense up to float rounding), and
    the round trip gives back the kernels within float rounding."""
    torch.manual_seed(0)
    layer, x = spectral_layer(kind, spec, "dense", rank=2)
    x = x.float()
    with torch.no_grad():
        layer.modulations.normal_()
    kernels, dense, y = layer.kernels.detach().clone(), layer.to_dense().weight.detach(), layer(x).detach()
    for impl in (*block_paths, *[p for p in layer.impls() if p not in block_paths], *block_paths[::-1], "dense"):
        layer.impl = impl
        form = "spectrum" if impl in block_paths else "kernels"
        assert layer.stored_form == form and f"{form}" in layer.state_dict()
        assert ({"kernels", "spectrum"} - {form}).isdisjoint(layer.state_dict())
        assert layer.num_structured_parameters == kernels.numel() + layer.modulations.numel()
        torch.testing.assert_close(layer.to_dense().weight, dense, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.kernels, kernels, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("kind,spec,block_paths", SPECTRAL)
def test_exact_layers_stay_equivariant_on_the_stored_spectrum(kind, spec, block_paths):
    """An exact GM (rank 1, no modulation, shared bias) stored as a spectrum is equivariant to rounding on its block
    paths, measured on transformed real inputs, after a conversion from the kernels form."""
    torch.manual_seed(0)
    layer, _ = spectral_layer(kind, spec, "dense", rank=1, modulate=False, bias="shared", dtype=torch.float64)
    for impl in block_paths:
        layer.impl = impl
        assert layer.stored_form == "spectrum"
        assert layer.check_equivariance() < 1e-12


def test_the_spectrum_trains_in_its_own_coordinates_and_is_written_by_fits():
    """The spectrum is the parameter an optimizer steps (the kernels follow), set_kernels and load_fit write it, and
    a reset draws the same function as the kernels form does."""
    torch.manual_seed(0)
    layer = GMLinear(24, 16, "C8", rank=2, impl="blocks")
    assert [name for name, _ in layer.named_parameters()] == ["spectrum", "modulations", "bias"]
    before = layer.kernels.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(4, 24)).square().sum().backward()
    opt.step()
    assert not torch.allclose(layer.kernels, before)
    dense = GMLinear.from_dense(nn.Linear(24, 16), "C8", rank=2, impl="dense")
    blocks = GMLinear.from_dense(dense.to_dense(), "C8", rank=2, impl="blocks")
    assert blocks.stored_form == "spectrum"
    torch.testing.assert_close(blocks.kernels, dense.kernels.detach(), atol=1e-6, rtol=1e-5)
    with pytest.raises(KeyError, match="kernels"):
        blocks.kernels = nn.Parameter(dense.kernels.detach().clone())  # derived: not a parameter to assign


def augmented_add(kernels):
    kernels += 1


IN_PLACE_WRITES = {
    "method": lambda k: k.mul_(2),
    "data copy_": lambda k: k.data.copy_(torch.zeros_like(k)),
    "detach": lambda k: k.detach().zero_(),
    "setitem": lambda k: k.__setitem__(0, 0.0),
    "view of detach": lambda k: k.detach()[0, :, 1].add_(1),
    "augmented": augmented_add,
    "out=": lambda k: torch.mul(k.detach(), 2, out=k.detach()),
    "data =": lambda k: setattr(k, "data", torch.zeros_like(k)),
    "inplace=True": lambda k: nn.functional.relu(k.detach(), inplace=True),
    "init.zeros_": lambda k: nn.init.zeros_(k),
    "init.normal_": lambda k: nn.init.normal_(k.detach()),
    "init.kaiming_uniform_": lambda k: nn.init.kaiming_uniform_(k),
    "init.orthogonal_": lambda k: nn.init.orthogonal_(k[0, 0]),
    "init.eye_": lambda k: nn.init.eye_(k.detach()[0, 0]),
}


@pytest.mark.parametrize("write", IN_PLACE_WRITES.values(), ids=IN_PLACE_WRITES.keys())
@pytest.mark.parametrize("kind,spec,block_paths", SPECTRAL[::2])
def test_in_place_writes_to_derived_kernels_raise_and_set_kernels_writes(kind, spec, block_paths, write):
    """On a layer storing the spectrum, every in-place write to ``kernels`` (a temporary derived on each read), a view
    of it or its ``.data`` raises naming the layer and the fix, and leaves the layer as it was; ``set_kernels`` writes
    the kernels: the output is then that of the dense path with those kernels."""
    torch.manual_seed(0)
    layer, x = spectral_layer(kind, spec, block_paths[0], rank=2, dtype=torch.float64)
    x = x.double()
    y = layer(x).detach()
    name = type(layer).__name__
    with pytest.raises(
        RuntimeError, match=rf"{name}\.kernels is derived from the stored `spectrum`.*set_kernels.*dense"
    ):
        write(layer.kernels)
    assert torch.equal(layer(x), y)
    kernels = torch.randn(layer.kernels.shape, dtype=torch.float64)
    layer.set_kernels(kernels)
    dense, _ = spectral_layer(kind, spec, "dense", rank=2, dtype=torch.float64)
    dense.load_state_dict(layer.state_dict())
    dense.kernels.data.copy_(kernels)  # a kernels-stored layer: the parameter itself, written as before
    torch.testing.assert_close(layer(x), dense(x), atol=1e-12, rtol=1e-10)


def test_derived_kernels_read_like_a_tensor_and_forward_never_reads_them(monkeypatch):
    """Reads of a spectrum layer's kernels: the derived values (also against the kernels read off the dense weight),
    plain tensors from fresh results, read-only numpy views, gradients reaching ``spectrum``; a kernels-stored layer
    returns its parameter; forward on the block paths never reads ``kernels``."""
    torch.manual_seed(0)
    layer = GMLinear(16, 24, "C8", rank=1, modulate=False, impl="blocks", dtype=torch.float64)
    kernels = layer.kernels
    assert torch.equal(kernels, layer._spectrum_to_kernels(layer.spectrum))
    from_dense = torch.zeros(1, 3, 2, 8, dtype=torch.float64)
    from_dense[0][:, :, layer._index] = layer.to_dense().weight.detach().view(3, 8, 2, 8).permute(0, 2, 1, 3)
    torch.testing.assert_close(kernels, from_dense, atol=1e-14, rtol=0)
    assert type(kernels * 2) is torch.Tensor and type(kernels.clone()) is torch.Tensor
    assert torch.allclose(kernels[0], from_dense[0]) and kernels.shape == (1, 3, 2, 8)
    array = kernels.detach().cpu().numpy()
    np.testing.assert_array_equal(array, from_dense.numpy())
    with pytest.raises(ValueError, match="read-only"):
        array[0] = 0.0
    kernels.sum().backward()
    from_spectrum = torch.from_numpy(np.linalg.inv(spectrum_map(layer.group)))  # kernels[..., s] = F[s] @ spectrum
    torch.testing.assert_close(layer.spectrum.grad, from_spectrum.sum(0)[:, None, None].expand(8, 2, 3))
    dense = GMLinear(16, 24, "C8", impl="dense")
    assert dense.kernels is dense._parameters["kernels"]
    conv = GMChannelConv(16, 16, 3, "C8", padding=1, impl="grouped")
    for cls in (GMLinear, GMChannelConv):
        monkeypatch.setattr(cls, "kernels", property(lambda self: pytest.fail("forward read kernels")))
    for impl in ("blocks", "packed"):
        layer.impl = impl
        assert layer.stored_form == "spectrum"
        layer(torch.randn(3, 16, dtype=torch.float64))
    assert conv.stored_form == "spectrum"
    conv(torch.randn(2, 16, 5, 5))


@pytest.mark.parametrize("kind,spec,block_paths", SPECTRAL)
def test_state_dicts_of_either_form_load_into_either(kind, spec, block_paths):
    """A kernels state_dict (an old checkpoint, a layer on another path) loads into a spectrum-form layer and back,
    strictly, giving the same outputs; a training checkpoint's optimizer-free state round-trips bit for bit."""
    torch.manual_seed(0)
    source, x = spectral_layer(kind, spec, "dense", rank=2)
    x = x.float()
    with torch.no_grad():
        source.modulations.normal_()
    target, _ = spectral_layer(kind, spec, block_paths[0], rank=2)
    target.load_state_dict(source.state_dict())
    assert target.stored_form == "spectrum"
    torch.testing.assert_close(target(x), source(x), atol=1e-5, rtol=1e-5)
    back, _ = spectral_layer(kind, spec, "dense", rank=2)
    back.load_state_dict(target.state_dict())
    torch.testing.assert_close(back.kernels, source.kernels, atol=1e-7, rtol=1e-6)
    again, _ = spectral_layer(kind, spec, block_paths[0], rank=2)
    again.load_state_dict(target.state_dict())
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in again.state_dict().items())


def format2_architecture():
    """The architecture of tests/data/model_format2.pt (saved by gmcompress in format 2, every layer's kernels
    stored as "kernels"): GMChannelConv C8 grouped, GMConv2d C4, GMLinear C8 blocks and a GMLinear C4 stencil."""
    return nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 16),
    )  # fmt: skip


def test_a_format2_file_loads_to_the_same_outputs(tmp_path):
    """The committed format-2 file loads: the block-path layers now store spectra (converted), the outputs equal
    those saved with it to float rounding, the layers stored as kernels load bit for bit; saved again (format 3),
    it loads bit for bit."""
    from pathlib import Path

    data = Path(__file__).parent / "data"
    saved = torch.load(data / "model_format2.pt", weights_only=True)
    assert saved["manifest"]["format"] == "gmcompress/2"
    model = gm.load(data / "model_format2.pt", format2_architecture()).eval()
    assert [model[i].stored_form for i in (0, 2, 5, 7)] == ["spectrum", "kernels", "spectrum", "kernels"]
    assert torch.equal(model[7].kernels, saved["state_dict"]["7.kernels"])
    assert torch.equal(model[2].kernels, saved["state_dict"]["2.kernels"])
    io_pair = torch.load(data / "model_format2_io.pt", weights_only=True)
    with torch.no_grad():
        y = model(io_pair["input"])
    torch.testing.assert_close(y, io_pair["output"], atol=1e-5, rtol=1e-5)
    gm.save(model, tmp_path / "again.pt")
    assert torch.load(tmp_path / "again.pt", weights_only=True)["manifest"]["format"] == gm.io.FORMAT
    again = gm.load(tmp_path / "again.pt", format2_architecture()).eval()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    with torch.no_grad():
        assert torch.equal(again(io_pair["input"]), y)


def test_a_layer_pickled_whole_before_the_stored_form_loads_and_converts():
    """A GMLinear pickled by gmcompress before the stored form (``impl`` a plain attribute, kernels a parameter)
    unpickles, gives the saved output, and converts to the spectrum when its path is set again."""
    from pathlib import Path

    data = torch.load(Path(__file__).parent / "data" / "gmlinear_pickled_format2.pt", weights_only=False)
    layer, x = data["layer"], data["input"]
    assert layer.impl == "blocks" and layer.stored_form == "kernels"
    with torch.no_grad():
        torch.testing.assert_close(layer(x), data["output"], atol=1e-6, rtol=1e-6)  # products reordered: rounding
    layer.impl = "blocks"
    assert layer.stored_form == "spectrum"
    with torch.no_grad():
        torch.testing.assert_close(layer(x), data["output"], atol=1e-5, rtol=1e-5)
