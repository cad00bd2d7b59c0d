"""The ODIN formulas against a plain per-image reimplementation, written the obvious way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from odin_engine.models.cifar_resnet import CifarResNet
from odin_engine.odin import baseline_scores, odin_scores, perturbation_direction

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _model(dtype=torch.float64, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    m = CifarResNet(20)
    # non-trivial BatchNorm statistics so eval mode matters
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    m = m.to(dtype).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _normalized(n: int, dtype=torch.float64, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, 32, 32, generator=g, dtype=dtype)
    return (pixels - MEAN.to(dtype)) / STD.to(dtype)


def reference_odin_one(model, x1, std, T, eps):
    """One image, written out step by step as in the paper's description."""
    x = x1.unsqueeze(0).clone().requires_grad_(True)
    logits = model(x)
    label = int(torch.argmax(logits[0]))  # 1. untempered argmax
    loss = F.cross_entropy(logits / T, torch.tensor([label]))  # 2. CE at temperature T
    loss.backward()
    grad = x.grad[0]
    g = torch.ones_like(grad)  # 3. sign, zero -> +1
    g[grad < 0] = -1.0
    g = g / std.view(3, 1, 1).to(g)
    x_tilde = x1 - eps * g  # 4. step against the gradient sign
    with torch.no_grad():
        s = torch.softmax(model(x_tilde.unsqueeze(0)) / T, dim=1).max().item()
        clean = model(x1.unsqueeze(0))[0]
    return {
        "pred": label,
        "odin": s,
        "msp": torch.softmax(clean, 0).max().item(),
        "max_logit": clean.max().item(),
        "energy": torch.logsumexp(clean, 0).item(),
    }


@pytest.mark.parametrize("T,eps", [(1000.0, 0.0014), (1.0, 0.004), (10.0, 0.0)])
def test_batched_scores_match_per_image_reference(T, eps):
    model = _model()
    x = _normalized(6)
    out = odin_scores(model, x, STD.flatten().double(), T, eps)
    for i in range(x.shape[0]):
        ref = reference_odin_one(model, x[i], STD.flatten(), T, eps)
        assert int(out["pred"][i]) == ref["pred"]
        for key in ("odin", "msp", "max_logit", "energy"):
            assert float(out[key][i]) == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key


def test_scores_do_not_depend_on_the_batch():
    model = _model()
    x = _normalized(8)
    together = odin_scores(model, x, STD.flatten().double(), 1000.0, 0.0014)
    alone = [odin_scores(model, x[i : i + 1], STD.flatten().double(), 1000.0, 0.0014) for i in range(8)]
    shuffled_idx = torch.tensor([3, 7, 0, 5, 1, 6, 2, 4])
    shuffled = odin_scores(model, x[shuffled_idx], STD.flatten().double(), 1000.0, 0.0014)
    for key in ("odin", "msp", "energy"):
        single = torch.cat([a[key] for a in alone])
        torch.testing.assert_close(together[key], single, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(shuffled[key], together[key][shuffled_idx], rtol=1e-12, atol=1e-12)


def test_direction_is_sign_over_std_with_zero_mapped_to_plus_one():
    class LeftHalfOnly(nn.Module):
        """Logits depend only on the left half of the image: the right half has zero gradient."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 32 * 16, 4).double()

        def forward(self, x):
            return self.fc(x[..., :16].flatten(1))

    model = LeftHalfOnly().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = _normalized(3)
    std = torch.tensor([0.2, 0.4, 0.8], dtype=torch.float64)
    direction, first = perturbation_direction(model, x, std, 1000.0)
    # right half: gradient exactly zero -> sign +1 -> 1/std per channel
    expected_right = (1.0 / std).view(1, 3, 1, 1).expand(3, 3, 32, 16)
    torch.testing.assert_close(direction[..., 16:], expected_right)
    # left half: ±1/std and nothing else
    left = direction[..., :16] * std.view(1, 3, 1, 1)
    assert set(left.unique().tolist()) <= {-1.0, 1.0}
    assert first.pred.shape == (3,)


def test_label_comes_from_untempered_logits_and_gradient_from_tempered_loss():
    model = _model()
    x = _normalized(4)
    d1, f1 = perturbation_direction(model, x, STD.flatten().double(), 1.0)
    d1000, f1000 = perturbation_direction(model, x, STD.flatten().double(), 1000.0)
    assert torch.equal(f1.pred, f1000.pred)  # the label ignores T
    assert torch.equal(f1.pred, model(x).argmax(1))
    assert not torch.equal(d1, d1000)  # the sign does depend on T


def test_no_parameter_gradients_and_model_state_untouched():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    odin_scores(model, _normalized(4), STD.flatten().double(), 1000.0, 0.0014)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_epsilon_zero_is_tempered_softmax_of_clean_input():
    model = _model()
    x = _normalized(5)
    out = odin_scores(model, x, STD.flatten().double(), 50.0, 0.0)
    with torch.no_grad():
        expected = torch.softmax(model(x) / 50.0, 1).amax(1)
    torch.testing.assert_close(out["odin"], expected)


def test_baselines_from_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    out = baseline_scores(logits)
    np.testing.assert_allclose(out["max_logit"], [2.0, 0.0])
    np.testing.assert_allclose(out["msp"], [np.exp(2) / (np.exp(2) + np.exp(1) + 1), 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(out["energy"], [np.log(np.exp(2) + np.exp(1) + 1), np.log(3)], rtol=1e-6)
    hot = baseline_scores(logits, energy_temperature=10.0)["energy"]
    np.testing.assert_allclose(hot, 10 * np.log(np.exp(logits.numpy() / 10).sum(1)), rtol=1e-6)


def test_perturbation_moves_odin_score_up_for_typical_inputs():
    """The perturbation is built to raise the softmax score: check that it does on most images."""
    model = _model()
    x = _normalized(16)
    clean = odin_scores(model, x, STD.flatten().double(), 1000.0, 0.0)["odin"]
    pert = odin_scores(model, x, STD.flatten().double(), 1000.0, 0.002)["odin"]
    assert (pert > clean).float().mean() >= 0.9
