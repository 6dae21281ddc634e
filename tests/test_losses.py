"""The losses against independent float64 computations of their formulas."""
import math

import pytest
import torch

from smi_timm.losses import (
    BarlowTwinsLoss,
    SMILoss,
    VICRegLoss,
    barlow_twins_loss,
    create_loss,
    smi_loss,
    smi_loss_reference,
    vicreg_loss,
)
from smi_timm.losses.smi import DEFAULT_EPS, DEFAULT_NEG_WEIGHT

# fp32 computation checked against a float64 computation of the same formula.
ATOL, RTOL = 1e-5, 1e-4


def smi_float64(za, zb, neg_weight=DEFAULT_NEG_WEIGHT, eps=DEFAULT_EPS, transform="mi"):
    """The SMI formula (the default reading), written independently of the library."""
    return smi_reading_float64(za, zb, neg_weight, eps, transform)


def barlow_float64(za, zb, lambd):
    a, b = za.double(), zb.double()
    n, d = a.shape
    a = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + 1e-5)
    b = (b - b.mean(0)) / torch.sqrt(b.var(0, unbiased=False) + 1e-5)
    c = torch.einsum("ni,nj->ij", a, b) / n
    loss = 0.0
    for i in range(d):
        for j in range(d):
            loss = loss + ((1 - c[i, j]) ** 2 if i == j else lambd * c[i, j] ** 2)
    return loss


def vicreg_float64(za, zb, s=25.0, v=25.0, c=1.0):
    x, y = za.double(), zb.double()
    n, d = x.shape
    inv = ((x - y) ** 2).mean()
    var = 0.0
    cov = 0.0
    for z in (x, y):
        zc = z - z.mean(0)
        var = var + torch.relu(1 - torch.sqrt(zc.pow(2).sum(0) / (n - 1) + 1e-4)).mean() / 2
        cm = zc.T @ zc / (n - 1)
        cov = cov + (cm.pow(2).sum() - cm.diagonal().pow(2).sum()) / d
    return s * inv + v * var + c * cov


def _pair(n, d, seed=0, noise=0.5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    za = torch.randn(n, d, generator=g, dtype=dtype)
    zb = za + noise * torch.randn(n, d, generator=g, dtype=dtype)
    return za, zb


def _value_and_grads(fn, za, zb):
    za = za.clone().requires_grad_(True)
    zb = zb.clone().requires_grad_(True)
    loss = fn(za, zb)
    ga, gb = torch.autograd.grad(loss, (za, zb))
    return loss.detach(), ga, gb


def _assert_close_to_float64(fn, ref, za, zb, atol=ATOL, rtol=RTOL):
    loss, ga, gb = _value_and_grads(fn, za, zb)
    rloss, rga, rgb = _value_and_grads(ref, za.double(), zb.double())
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss.double(), rloss, atol=atol, rtol=rtol)
    torch.testing.assert_close(ga.double(), rga, atol=atol, rtol=rtol)
    torch.testing.assert_close(gb.double(), rgb, atol=atol, rtol=rtol)


@pytest.mark.parametrize("transform", ["mi", "square"])
@pytest.mark.parametrize("n,d", [(2, 2), (3, 5), (17, 64), (129, 130), (2, 130), (129, 2)])
def test_smi_matches_float64_formula(n, d, transform):
    za, zb = _pair(n, d, seed=n * 1000 + d)
    # With D = 2 every standardised row is ±(1, −1)/1.0000005, so every ρ_ij ≈ ±1: the degenerate tolerance applies.
    tol = dict(atol=2e-4, rtol=2e-3) if d == 2 else {}
    for neg_weight, eps in ((1.0, 1e-3), (16.0, 1e-1)):
        _assert_close_to_float64(
            lambda a, b, nw=neg_weight, e=eps: smi_loss(a, b, neg_weight=nw, eps=e, transform=transform,
                                                        backend="torch"),
            lambda a, b, nw=neg_weight, e=eps: smi_float64(a, b, nw, e, transform), za, zb, **tol)


@pytest.mark.parametrize("case", ["same", "negated", "identical_rows", "constant_row", "tiny_scale", "huge_scale"])
def test_smi_near_degenerate_inputs(case):
    n, d = 9, 33
    za, zb = _pair(n, d, seed=3)
    if case == "same":  # ρ_ii = 1 − O(1e-6): the MI map is at its ceiling
        zb = za.clone()
    elif case == "negated":  # ρ_ii ≈ −1
        zb = -za
    elif case == "identical_rows":  # every ρ_ij ≈ ±1
        za = za[:1].repeat(n, 1)
        zb = za.clone()
    elif case == "constant_row":  # zero variance: the standardised row is 0, so is its ρ row
        za[2] = 3.0
    elif case == "tiny_scale":  # variance far below the 1e-6 in the standardisation
        za, zb = za * 1e-5, zb * 1e-5
    elif case == "huge_scale":
        za, zb = za * 1e4, zb * 1e4
    # ρ ≈ ±1 makes 1/(1+ε−ρ²) ≈ 1/ε: float32 rounding of ρ (~1e-7) is amplified by up to 1/ε in the gradient.
    _assert_close_to_float64(lambda a, b: smi_loss(a, b, backend="torch"), smi_float64, za, zb, atol=2e-4, rtol=2e-3)
    loss = smi_loss(za, zb, backend="torch")
    assert torch.isfinite(loss)
    if case in ("same", "negated", "identical_rows"):
        ceiling = 0.5 * math.log((1 + DEFAULT_EPS) / DEFAULT_EPS)
        assert -loss.item() <= ceiling + 1e-5


def test_smi_value_at_known_points():
    # Orthogonal standardised rows: ρ = I exactly, so L = −φ(1) and off-diagonals vanish.
    za = torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0]])
    eps = 1e-3
    # var = 1, standardisation divides by sqrt(1 + 1e-6): ρ_ii = 1/(1 + 1e-6)
    rho = 1 / (1 + 1e-6)
    expected = -(0.5 * math.log(1 + eps) - 0.5 * math.log(1 + eps - rho ** 2))
    # float32 rounding of ρ² (~1e-7) against 1 + ε − ρ² ≈ 1e-3: relative error up to ~1e-4
    assert smi_loss(za, za, eps=eps, backend="torch").item() == pytest.approx(expected, rel=1e-4)
    assert smi_loss(za, za, transform="square", backend="torch").item() == pytest.approx(-0.5 * rho ** 2, rel=1e-6)


def test_square_transform_is_half_rho_squared():
    za, zb = _pair(11, 23, seed=5)
    a = (za - za.mean(1, keepdim=True)) / torch.sqrt(za.var(1, unbiased=False, keepdim=True) + 1e-6)
    b = (zb - zb.mean(1, keepdim=True)) / torch.sqrt(zb.var(1, unbiased=False, keepdim=True) + 1e-6)
    rho = a @ b.T / 23
    eye = torch.eye(11, dtype=torch.bool)
    expected = -(0.5 * rho[eye] ** 2).mean() + 4.0 * (0.5 * rho[~eye] ** 2).mean()
    got = smi_loss(za, zb, neg_weight=4.0, transform="square", backend="torch")
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 16, 63])
def test_chunked_matches_unchunked(chunk):
    za, zb = _pair(63, 40, seed=7)
    full = _value_and_grads(lambda a, b: smi_loss_reference(a, b, neg_weight=8.0, chunk_size=10 ** 6), za, zb)
    part = _value_and_grads(lambda a, b: smi_loss_reference(a, b, neg_weight=8.0, chunk_size=chunk), za, zb)
    for x, y in zip(full, part):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("transform", ["mi", "square"])
def test_gradcheck_float64(chunk, transform):
    za, zb = _pair(7, 6, seed=11, dtype=torch.float64)
    za.requires_grad_(True)
    zb.requires_grad_(True)
    fn = lambda a, b: smi_loss_reference(a, b, neg_weight=3.0, eps=1e-2, transform=transform, chunk_size=chunk,  # noqa
                                         compute_dtype=torch.float64)
    assert torch.autograd.gradcheck(fn, (za, zb), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_gives_float32(dtype):
    za, zb = _pair(8, 16, seed=1)
    loss = SMILoss(backend="torch")(za.to(dtype), zb.to(dtype))
    assert loss.dtype == torch.float32
    ref = smi_float64(za.to(dtype), zb.to(dtype))
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)


def test_module_and_functional_agree_and_repr():
    za, zb = _pair(10, 12)
    m = SMILoss(neg_weight=4.0, eps=1e-2, transform="mi", backend="torch")
    assert m(za, zb).item() == pytest.approx(smi_loss(za, zb, neg_weight=4.0, eps=1e-2, backend="torch").item())
    assert "neg_weight=4.0" in repr(m)
    # backend="auto" on CPU tensors is the torch path
    assert SMILoss(neg_weight=4.0, eps=1e-2)(za, zb).item() == pytest.approx(m(za, zb).item(), abs=1e-6)


def _simclr(za, zb):
    from smi_timm.losses import simclr_loss

    return simclr_loss(za, zb)


@pytest.mark.parametrize("loss_fn", [smi_loss, barlow_twins_loss, vicreg_loss, _simclr])
@pytest.mark.parametrize("za,zb,match", [
    (torch.randn(1, 8), torch.randn(1, 8), r"at least 2 samples.*\(1, 8\)"),
    (torch.randn(4, 1), torch.randn(4, 1), r"at least 2 features.*\(4, 1\)"),
    (torch.randn(4, 8), torch.randn(5, 8), r"same shape.*\(4, 8\).*\(5, 8\)"),
    (torch.randn(8), torch.randn(8), r"2-D.*\(8,\)"),
    (torch.randn(2, 4, 8), torch.randn(2, 4, 8), r"2-D.*\(2, 4, 8\)"),
    (torch.ones(4, 8, dtype=torch.long), torch.ones(4, 8, dtype=torch.long), r"floating.*torch.int64"),
])
def test_bad_input_errors(loss_fn, za, zb, match):
    with pytest.raises(ValueError, match=match):
        loss_fn(za, zb)


def test_bad_options_list_valid_values():
    with pytest.raises(ValueError, match=r"transform.*'mi', 'square'"):
        SMILoss(transform="log")
    with pytest.raises(ValueError, match=r"backend.*'auto', 'torch', 'triton'"):
        SMILoss(backend="cuda")
    with pytest.raises(ValueError, match=r"loss.*'smi', 'barlow', 'vicreg', 'simclr'"):
        create_loss("byol")
    with pytest.raises(ValueError, match="eps must be > 0"):
        SMILoss(eps=0.0)


@pytest.mark.parametrize("n,d", [(2, 2), (5, 7), (16, 12)])
def test_barlow_matches_float64(n, d):
    za, zb = _pair(n, d, seed=n + d)
    _assert_close_to_float64(lambda a, b: BarlowTwinsLoss(lambd=0.0051)(a, b),
                             lambda a, b: barlow_float64(a, b, 0.0051), za, zb)
    _assert_close_to_float64(lambda a, b: barlow_twins_loss(a, b, lambd=0.5),
                             lambda a, b: barlow_float64(a, b, 0.5), za, zb)


@pytest.mark.parametrize("n,d", [(2, 2), (5, 7), (16, 12)])
def test_vicreg_matches_float64(n, d):
    za, zb = _pair(n, d, seed=n * d)
    _assert_close_to_float64(lambda a, b: VICRegLoss()(a, b), vicreg_float64, za, zb, atol=1e-4)
    _assert_close_to_float64(lambda a, b: vicreg_loss(a, b, 1.0, 2.0, 3.0),
                             lambda a, b: vicreg_float64(a, b, 1.0, 2.0, 3.0), za, zb, atol=1e-4)


def test_create_loss_by_name():
    assert isinstance(create_loss("smi", neg_weight=2.0), SMILoss)
    assert isinstance(create_loss("barlow", lambd=0.1), BarlowTwinsLoss)
    assert isinstance(create_loss("vicreg"), VICRegLoss)


# ---------------------------------------------------------------------------------------------------------------------
# the alternative readings of SMI: standardize="feature_row", negatives="logmeanexp"
# ---------------------------------------------------------------------------------------------------------------------

def smi_reading_float64(za, zb, neg_weight, eps, transform="mi", standardize="row", negatives="mean"):
    """Both readings of the SMI formula in float64, written out independently of the library."""
    a, b = za.double(), zb.double()
    n, d = a.shape

    def std_features(x):
        mu = x.sum(0, keepdim=True) / n
        var = ((x - mu) ** 2).sum(0, keepdim=True) / n
        return (x - mu) / torch.sqrt(var + 1e-6)

    def std_rows(x):
        mu = x.sum(1, keepdim=True) / d
        var = ((x - mu) ** 2).sum(1, keepdim=True) / d
        return (x - mu) / torch.sqrt(var + 1e-6)

    if standardize == "feature_row":
        a, b = std_features(a), std_features(b)
    rho = std_rows(a) @ std_rows(b).T / d
    if transform == "mi":
        dep = 0.5 * math.log(1 + eps) - 0.5 * torch.log(1 + eps - torch.clamp(rho ** 2, max=1.0))
    else:
        dep = 0.5 * rho ** 2
    eye = torch.eye(n, dtype=torch.bool)
    pos = dep[eye].sum() / n
    if negatives == "mean":
        neg = dep[~eye].sum() / (n * (n - 1))
    else:  # log of the mean of exp over the n(n-1) off-diagonal pairs, plainly (no shift: float64, φ ≤ 3.5)
        neg = torch.log(torch.exp(dep[~eye]).sum() / (n * (n - 1)))
    return -pos + neg_weight * neg


READINGS = [("feature_row", "mean"), ("row", "logmeanexp"), ("feature_row", "logmeanexp")]


@pytest.mark.parametrize("standardize,negatives", READINGS)
@pytest.mark.parametrize("transform", ["mi", "square"])
# (N = 2 is degenerate for feature_row: standardised over two samples, the rows are exactly ±(each other))
@pytest.mark.parametrize("n,d", [(4, 3), (3, 5), (17, 64), (129, 130), (33, 7)])
def test_smi_readings_match_float64(n, d, transform, standardize, negatives):
    za, zb = _pair(n, d, seed=n * 100 + d)
    # shift and scale features unequally: the common mode and unequal variances feature_row removes
    za = za * torch.linspace(0.5, 3.0, d) + 2.0
    zb = zb * torch.linspace(0.5, 3.0, d) + 2.0
    # D = 3: ρ_ij near ±1 is common, where float32 rounding of ρ (~1e-7) is amplified by up to 1/ε in the gradient
    tol = dict(atol=2e-4, rtol=2e-3) if d <= 3 else {}
    for nw, eps in ((1.0, 1e-3), (16.0, 1e-1)):
        kw = dict(neg_weight=nw, eps=eps, transform=transform, standardize=standardize, negatives=negatives)
        _assert_close_to_float64(lambda a, b, kw=kw: smi_loss(a, b, backend="torch", **kw),
                                 lambda a, b, kw=kw: smi_reading_float64(a, b, **kw), za, zb, **tol)


@pytest.mark.parametrize("standardize,negatives", READINGS)
def test_smi_readings_chunked_and_gradcheck(standardize, negatives):
    za, zb = _pair(23, 9, seed=4)
    kw = dict(neg_weight=8.0, eps=1e-2, standardize=standardize, negatives=negatives)
    full = _value_and_grads(lambda a, b: smi_loss_reference(a, b, chunk_size=10 ** 6, **kw), za, zb)
    # the loss is a difference of terms of magnitude w·log(N(N−1)) ≈ 50, each rounded in float32 (chunks sum in
    # another order): 2e-5 absolute on the value
    for chunk in (1, 5, 22):
        part = _value_and_grads(lambda a, b, c=chunk: smi_loss_reference(a, b, chunk_size=c, **kw), za, zb)
        for x, y in zip(full, part):
            torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)
    a64, b64 = (x[:7, :6].double().requires_grad_(True) for x in (za, zb))
    fn = lambda a, b: smi_loss_reference(a, b, compute_dtype=torch.float64, chunk_size=3, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a64, b64), eps=1e-6, atol=1e-6)


def test_logmeanexp_equals_mean_form_to_first_order():
    # small correlations: log-mean-exp(φ) = mean(φ) + O(φ²)
    za, zb = _pair(40, 512, seed=9, noise=50.0)
    mean = smi_loss(za, zb, neg_weight=4.0, backend="torch")
    lme = smi_loss(za, zb, neg_weight=4.0, negatives="logmeanexp", backend="torch")
    assert abs((lme - mean).item()) < 1e-3 * abs(mean.item()) + 1e-5
    assert lme.item() >= mean.item()  # Jensen: log E exp(φ) ≥ E φ


def test_feature_row_removes_a_common_mode():
    za, zb = _pair(16, 24, seed=2)
    common = 5.0 * torch.randn(1, 24)  # one direction shared by every sample
    plain = smi_loss(za, zb, backend="torch", standardize="feature_row")
    shifted = smi_loss(za + common, zb + common, backend="torch", standardize="feature_row")
    assert shifted.item() == pytest.approx(plain.item(), abs=1e-5)
    assert smi_loss(za + common, zb + common, backend="torch").item() != pytest.approx(
        smi_loss(za, zb, backend="torch").item(), abs=1e-2)


def test_unfused_readings_refuse_triton_and_auto_falls_back(monkeypatch):
    import warnings

    from smi_timm.losses import smi as smi_module

    with pytest.raises(ValueError, match=r"backend='triton' fuses only.*logmeanexp.*backend='torch'"):
        SMILoss(backend="triton", negatives="logmeanexp")
    # pretend the device is a GPU with Triton: auto would pick the kernels for the default reading only
    monkeypatch.setattr(smi_module, "resolve_backend", lambda backend, device: "triton")
    monkeypatch.setattr(smi_module, "_WARNED_UNFUSED", set())
    assert smi_module.effective_backend("auto", "cpu") == "triton"
    with pytest.warns(UserWarning, match="do not compute standardize='feature_row'"):
        assert smi_module.effective_backend("auto", "cpu", standardize="feature_row") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert smi_module.effective_backend("auto", "cpu", standardize="feature_row") == "torch"
    with pytest.raises(ValueError, match="use backend='torch'"):
        smi_module.effective_backend("triton", "cpu", negatives="logmeanexp")


def test_reading_options_validated_and_shown():
    with pytest.raises(ValueError, match=r"standardize.*'row', 'feature_row'"):
        SMILoss(standardize="feature")
    with pytest.raises(ValueError, match=r"negatives.*'mean', 'logmeanexp'"):
        smi_loss(torch.randn(4, 5), torch.randn(4, 5), negatives="lse")
    assert "standardize='feature_row'" in repr(SMILoss(standardize="feature_row"))
    assert "negatives" not in repr(SMILoss())


# ---------------------------------------------------------------------------------------------------------------------
# SimCLR (NT-Xent)
# ---------------------------------------------------------------------------------------------------------------------

def simclr_float64(za, zb, temperature):
    """NT-Xent written row by row: for each of the 2N embeddings, −log softmax over the other 2N − 1 at its
    positive (the other view)."""
    z = torch.cat([za, zb]).double()
    u = z / z.norm(dim=1, keepdim=True)
    m = u.shape[0]
    n = m // 2
    total = 0.0
    for k in range(m):
        pos = (k + n) % m
        others = [j for j in range(m) if j != k]
        logits = torch.stack([u[k] @ u[j] / temperature for j in others])
        total = total - (u[k] @ u[pos] / temperature - torch.logsumexp(logits, 0))
    return total / m


def simclr_lightly_blocks(za, zb, temperature):
    """The block form of lightly's ``NTXentLoss`` (memory bank off): [za·zbᵀ, za·zaᵀ without its diagonal] and
    [zb·zaᵀ, zb·zbᵀ without its diagonal] as the logits, label i in row i."""
    a, b = (torch.nn.functional.normalize(x.double(), dim=1) for x in (za, zb))
    n = a.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    l_ab, l_aa = a @ b.T / temperature, (a @ a.T / temperature)[off].view(n, n - 1)
    l_ba, l_bb = b @ a.T / temperature, (b @ b.T / temperature)[off].view(n, n - 1)
    logits = torch.cat([torch.cat([l_ab, l_aa], 1), torch.cat([l_ba, l_bb], 1)])
    labels = torch.cat([torch.arange(n), torch.arange(n)])
    return torch.nn.functional.cross_entropy(logits, labels)


@pytest.mark.parametrize("n,d", [(2, 2), (3, 5), (17, 64), (65, 3)])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_simclr_matches_float64_and_lightly_form(n, d, temperature):
    from smi_timm.losses import SimCLRLoss, simclr_loss

    za, zb = _pair(n, d, seed=n + 7 * d)
    za = za * 3.0 + 1.0  # not normalised: the loss normalises
    _assert_close_to_float64(lambda a, b: simclr_loss(a, b, temperature=temperature),
                             lambda a, b: simclr_float64(a, b, temperature), za, zb, atol=1e-5, rtol=1e-4)
    _assert_close_to_float64(lambda a, b: SimCLRLoss(temperature)(a, b),
                             lambda a, b: simclr_lightly_blocks(a, b, temperature), za, zb, atol=1e-5, rtol=1e-4)


def test_simclr_known_values_and_errors():
    from smi_timm.losses import SimCLRLoss, create_loss

    # two orthogonal pairs of identical views: every row's positive has similarity 1/τ, its two negatives 0
    za = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = 0.5
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2.0))
    assert SimCLRLoss(t)(za, za.clone()).item() == pytest.approx(expected, rel=1e-6)
    assert isinstance(create_loss("simclr", temperature=0.2), SimCLRLoss)
    assert "temperature=0.2" in repr(create_loss("simclr", temperature=0.2))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SimCLRLoss(temperature=0.0)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert SimCLRLoss()(za.to(dtype), za.to(dtype)).dtype == torch.float32
