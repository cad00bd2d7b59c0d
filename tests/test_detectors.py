"""The detectors beyond ODIN: the head hook, and per-image parity of every method with an
independent implementation of its paper formula written here (numpy + the model's own modules,
not the engine). A small synthetic version always runs; the test-bed version (ResNet-20 on the
shared CIFAR-10 test set) skips with a reason when ../shared/data is absent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from odin_engine.detectors.features import find_head
from odin_engine.detectors.fit import FitAccumulator, FitStats
from odin_engine.detectors.reference import fit_images
from odin_engine.errors import ConfigError
from odin_engine.loading import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, load_model
from odin_engine.methods import REGISTRY, TABLE_METHODS
from odin_engine.models.cifar_resnet import CifarResNet
from odin_engine.scorer import OdinScorer

from _odin_helpers import shared_data

T = 1000.0


# --------------------------------------------------------------------------- the head hook
def test_head_found_for_cifar_resnet20_torchvision_resnet18_and_vit_b_16():
    import torchvision

    assert find_head(CifarResNet(20).eval(), 32).name == "linear"
    r18 = torchvision.models.resnet18(weights=None).eval()
    head = find_head(r18, 64)
    assert head.name == "fc" and head.dim == 512
    vit = torchvision.models.vit_b_16(weights=None).eval()
    head = find_head(vit, 224)
    assert head.name == "heads.head" and head.dim == 768


class NoHead(nn.Module):
    """A classifier whose logits come from a 1×1 convolution: no nn.Linear anywhere."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def no_head() -> nn.Module:
    return NoHead()


def _loaded(module: nn.Module, spec: str = "synthetic") -> LoadedModel:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return LoadedModel(module, IMAGENET_MEAN, IMAGENET_STD, 10, 32, f"{spec}@sha256:0", spec)


def test_model_without_linear_head_is_a_config_error_only_when_features_are_needed():
    with pytest.raises(ConfigError, match="calls no nn.Linear"):
        find_head(NoHead().eval(), 32)
    loaded = _loaded(NoHead())
    out = OdinScorer(loaded, device="cpu").score(np.zeros((2, 32, 32, 3), np.uint8))
    assert np.isfinite(out["odin"]).all() and np.isfinite(out["gen"]).all()
    assert np.isnan(out["scale"]).all() and np.isnan(out["knn"]).all()  # not computed → null in the table
    with pytest.raises(ConfigError, match="calls no nn.Linear"):
        OdinScorer(loaded, device="cpu", methods=["scale"])
    with pytest.raises(ConfigError, match="no module"):
        OdinScorer(_loaded(CifarResNet(20)), device="cpu", head="fc")


def test_torchscript_has_no_hookable_head(tmp_path):
    scripted = torch.jit.script(CifarResNet(20).eval())
    with pytest.raises(ConfigError, match="TorchScript"):
        find_head(scripted, 32)


def test_bn_folding_and_channels_last_keep_the_same_features():
    torch.manual_seed(0)
    net = CifarResNet(20)
    for m in net.modules():  # non-trivial BN statistics, so that folding changes the weights
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    loaded = _loaded(net)
    imgs = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), np.uint8)
    fast = OdinScorer(loaded, device="cpu", optimize=True)
    plain = OdinScorer(loaded, device="cpu", optimize=False)
    assert fast.module is not plain.module and type(fast.module).__name__ == "GraphModule"  # BN really folded
    h_fast = next(fast.passes(imgs)).h
    h_plain = next(plain.passes(imgs)).h
    torch.testing.assert_close(h_fast, h_plain, rtol=1e-4, atol=1e-5)
    a, b = fast.score(imgs), plain.score(imgs)
    for name in ("scale", "ash_s"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4)


# --------------------------------------------------------------------------- the fit accumulator
def test_reservoir_bank_is_uniform_and_merges_uniformly():
    d, n, k = 3, 2000, 100
    counts = np.zeros(n)
    for seed in range(200):
        acc = FitAccumulator(d, np.zeros(d), bank_size=k, seed=seed)
        half = FitAccumulator(d, np.zeros(d), bank_size=k, seed=seed + 10_000)
        x = np.repeat(np.arange(n, dtype=np.float32)[:, None], d, axis=1)
        for s in range(0, 1200, 128):
            acc.update(x[s:min(s + 128, 1200)], np.zeros(min(s + 128, 1200) - s))
        half.update(x[1200:], np.zeros(n - 1200))
        acc.merge(half)
        assert acc.n == n and len(acc.bank) == k and len(np.unique(acc.bank[:, 0])) == k
        counts[acc.bank[:, 0].astype(int)] += 1
    # each item is in the bank with probability k/n = 0.05: 200 draws → mean 10 per item
    first, second = counts[:1200].mean(), counts[1200:].mean()
    assert abs(first - 10) < 1.0 and abs(second - 10) < 1.0
    np.testing.assert_allclose(acc.sum, x.sum(0), rtol=1e-9)


# --------------------------------------------------------------------------- per-image parity
def _features(net: CifarResNet, x: torch.Tensor) -> torch.Tensor:
    """The penultimate features by the model's own modules (not the hook)."""
    out = F.relu(net.bn1(net.conv1(x)))
    out = net.layer3(net.layer2(net.layer1(out)))
    return F.adaptive_avg_pool2d(out, 1).flatten(1)


def _normalize(imgs: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _lse(z):
    m = z.max(1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]


def _kept(d, p):
    return d - int(round(d * p / 100))


def _adascale_h_perturbed(net, x):
    """AdaSCALE's perturbed input from ODIN's gradient, written out: x − 0.5·sign(g)·m,
    m = the 5% of elements with the smallest |g|, g = ∂ Σ CE(f(x)/T, ŷ)/∂x."""
    x = x.clone().requires_grad_(True)
    z = net(x)
    loss = F.cross_entropy(z / T, z.argmax(1), reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    flat = g.abs().reshape(len(x), -1)
    m = torch.zeros_like(flat)
    for i in range(len(x)):
        m[i, np.argsort(flat[i].numpy(), kind="stable")[: int(flat.shape[1] * 0.05)]] = 1
    sign = torch.where(g >= 0, 1.0, -1.0)
    with torch.no_grad():
        return _features(net, x.detach() - 0.5 * sign * m.view_as(g)).numpy().astype(np.float64)


def _q(h, hp):
    d = h.shape[1]
    k1, k2 = max(1, int(d * 5 / 100)), max(1, int(d * 1 / 100))
    out = []
    for a, b in zip(h, hp):
        order = np.argsort(-a, kind="stable")
        out.append(np.maximum(b[order[:k1]], 0).sum() + 10 * np.abs(a - b)[order[:k2]].sum())
    return np.array(out)


def independent_scores(net: CifarResNet, ref_imgs: np.ndarray, imgs: np.ndarray) -> dict[str, np.ndarray]:
    """Every method's paper formula in numpy, from features the model's own modules compute."""
    W = net.linear.weight.detach().numpy().astype(np.float64)
    b = net.linear.bias.detach().numpy().astype(np.float64)
    with torch.no_grad():
        R = _features(net, _normalize(ref_imgs)).numpy().astype(np.float64)
        H = _features(net, _normalize(imgs)).numpy().astype(np.float64)
    Z, Zr = H @ W.T + b, R @ W.T + b
    D, C = H.shape[1], W.shape[0]
    out = {}
    p = np.exp(Z - Z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = -np.sort(-p, axis=1)[:, : min(100, C)]
    out["gen"] = -(top ** 0.1 * (1 - top) ** 0.1).sum(1)

    def shaped(h, pct, prune):
        k = _kept(D, pct)
        rows = []
        for v in h:
            order = np.argsort(-v, kind="stable")[:k]
            kept = np.zeros_like(v)
            kept[order] = v[order]
            r = v.sum() / v[order].sum()
            rows.append((kept if prune else v) * np.exp(r))
        return _lse(np.array(rows) @ W.T + b)

    out["scale"] = shaped(H, 85, False)
    out["ash_s"] = shaped(H, 90, True)
    out["react"] = _lse(np.minimum(H, np.percentile(R, 90)) @ W.T + b)
    hn = H / np.linalg.norm(H, axis=1, keepdims=True)
    rn = R / np.linalg.norm(R, axis=1, keepdims=True)
    dist = np.sqrt(((hn[:, None, :] - rn[None, :, :]) ** 2).sum(-1))
    out["knn"] = -np.sort(dist, axis=1)[:, min(50, len(R)) - 1]
    u = -np.linalg.pinv(W) @ b
    val, vec = np.linalg.eigh((R - u).T @ (R - u) / len(R))
    NS = vec[:, np.argsort(val)[::-1][D // 2:]]
    alpha = Zr.max(1).mean() / np.linalg.norm((R - u) @ NS, axis=1).mean()
    out["vim"] = _lse(Z) - alpha * np.linalg.norm((H - u) @ NS, axis=1)
    mu = R.mean(0)
    pred = Z.argmax(1)
    out["nci"] = ((W[pred] * (H - mu)).sum(1) / np.linalg.norm(H - mu, axis=1)
                  + 1e-4 * np.abs(H).sum(1))
    fd = []
    for i, c in enumerate(pred):
        others = [j for j in range(C) if j != c]
        fd.append(np.mean([(Z[i, c] - Z[i, j]) / np.linalg.norm(W[c] - W[j]) for j in others]))
    out["fdbd"] = np.array(fd) / np.linalg.norm(H - mu, axis=1)
    # AdaSCALE-A
    Hp = _adascale_h_perturbed(net, _normalize(imgs))
    Rp = _adascale_h_perturbed(net, _normalize(ref_imgs))
    q_ref = np.sort(_q(R, Rp))
    q = _q(H, Hp)
    cdf = np.searchsorted(q_ref, q, side="right") / len(q_ref)
    pct = 75 + (1 - cdf) * 10
    rows = []
    for v, pc in zip(H, pct):
        x = np.maximum(v, 0)
        k = max(1, D - int(np.round(D * pc / 100)))
        r = x.sum() / np.sort(x)[::-1][:k].sum()
        rows.append(v * np.exp(r))
    out["adascale"] = _lse(np.array(rows) @ W.T + b)
    return out


def _check_parity(net, loaded, ref_imgs, imgs, atol=0.0):
    fit = fit_images(loaded, ref_imgs, temperature=T, bank_size=len(ref_imgs), device="cpu", batch_size=64)
    fit = FitStats.from_bytes(fit.to_bytes())  # what `fit` writes is what scoring reads
    engine = OdinScorer(loaded, temperature=T, epsilon=0.0014, device="cpu", fit=fit, batch_size=64,
                         methods=["all"]).score(imgs)
    expect = independent_scores(net, ref_imgs, imgs)
    assert set(expect) == set(TABLE_METHODS) - {"msp", "max_logit", "energy", "odin"}
    for name, want in expect.items():
        np.testing.assert_allclose(engine[name], want, rtol=1e-4, atol=atol, err_msg=name)
    return engine


def test_every_method_matches_its_formula_synthetic():
    torch.manual_seed(1)
    net = CifarResNet(20).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 256, (60, 32, 32, 3), np.uint8)
    imgs = rng.integers(0, 256, (12, 32, 32, 3), np.uint8)
    _check_parity(net, _loaded(net), ref, imgs, atol=1e-6)


@pytest.mark.testbed
def test_every_method_matches_its_formula_on_the_test_bed():
    data = shared_data()
    weights = data / "weights" / "resnet20-12fca82f.th"
    if not weights.is_file():
        pytest.skip(f"test bed absent: {weights} not found (../shared/data)")
    loaded = load_model("cifar_resnet20", str(weights))
    net = loaded.module
    with np.load(data / "cifar10_test_jpeg_yoongikim.npz") as z:
        cifar = z["images"]
    with np.load(data / "ood" / "tin_crop.npz") as z:
        ood = z["images"][:16]
    imgs = np.concatenate([cifar[5000:5024], ood])
    _check_parity(net, loaded, cifar[:300], imgs, atol=1e-6)


def test_fit_refuses_another_model():
    torch.manual_seed(2)
    net = CifarResNet(20).eval()
    rng = np.random.default_rng(2)
    fit = fit_images(_loaded(net), rng.integers(0, 256, (8, 32, 32, 3), np.uint8), temperature=T, device="cpu")
    with pytest.raises(ConfigError, match="fitted for another model"):
        OdinScorer(_loaded(net, "other"), temperature=T, device="cpu", fit=fit)
    other_t = OdinScorer(_loaded(net), temperature=10.0, device="cpu", fit=fit)  # AdaSCALE's Q' was at T = 1000
    assert "knn" in other_t.methods and "adascale" not in other_t.methods
    with pytest.raises(ConfigError, match="temperature"):
        OdinScorer(_loaded(net), temperature=10.0, device="cpu", fit=fit, methods=["adascale"])
    with pytest.raises(ConfigError, match="odin-audit fit"):
        OdinScorer(_loaded(net), device="cpu", methods=["knn"])
    other_all = OdinScorer(_loaded(net), temperature=10.0, device="cpu", fit=fit, methods=["all"])
    assert "knn" in other_all.methods and "adascale" not in other_all.methods  # `all`: what this fit allows


def test_default_set_leaves_adascale_to_request_and_scores_do_not_depend_on_the_batch():
    """The default set is every method but AdaSCALE (its extra forward is paid only when asked for);
    with it, every image's scores are those it gets alone (batch 1), and ODIN's are those of an
    ODIN-only scorer."""
    torch.manual_seed(3)
    net = CifarResNet(20).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(3)
    loaded = _loaded(net)
    fit = fit_images(loaded, rng.integers(0, 256, (40, 32, 32, 3), np.uint8), temperature=T, device="cpu")
    imgs = rng.integers(0, 256, (9, 32, 32, 3), np.uint8)
    default = OdinScorer(loaded, temperature=T, epsilon=0.0014, device="cpu", fit=fit, batch_size=9)
    assert default.methods == [m for m in TABLE_METHODS if m != "adascale"]
    assert np.isnan(default.score(imgs[:2])["adascale"]).all()
    every = OdinScorer(loaded, temperature=T, epsilon=0.0014, device="cpu", fit=fit, batch_size=9,
                       methods=["default", "adascale"])
    assert every.methods == list(TABLE_METHODS)
    assert OdinScorer(loaded, temperature=T, device="cpu", fit=fit, methods=["all"]).methods == list(TABLE_METHODS)
    batched = every.score(imgs)
    alone = OdinScorer(loaded, temperature=T, epsilon=0.0014, device="cpu", fit=fit, batch_size=1,
                       methods=["all"]).score(imgs)
    for name in TABLE_METHODS:
        np.testing.assert_allclose(batched[name], alone[name], rtol=1e-4, atol=1e-6, err_msg=name)
    odin_only = OdinScorer(loaded, temperature=T, epsilon=0.0014, device="cpu", batch_size=9, methods=["odin"])
    np.testing.assert_allclose(batched["odin"], odin_only.score(imgs)["odin"], rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        OdinScorer(loaded, device="cpu", methods=["default", "nope"])


def test_methods_words_and_the_deciding_method():
    from odin_engine.methods import ON_REQUEST_METHODS, parse_methods, with_method

    assert ON_REQUEST_METHODS == ("adascale",)
    assert parse_methods(None) is None and parse_methods("default") is None and parse_methods(" , ") is None
    assert parse_methods("default, adascale,adascale") == ("default", "adascale")
    assert parse_methods(["all"]) == ("all",)
    with pytest.raises(ConfigError, match="--methods: unknown method 'knnn'"):
        parse_methods("default,knnn")
    # audit: the method δ thresholds is computed; an on-request one is added to the set
    assert with_method(None, "knn") is None
    assert with_method(None, "adascale") == ("default", "adascale")
    assert with_method(("all",), "adascale") == ("all",)
    assert with_method(("odin", "adascale"), "adascale") == ("odin", "adascale")
    assert with_method(("odin",), "knn") == ("odin", "knn")
