"""Public API of odin_engine: loaders (and their error messages), OdinScorer, the registry."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import odin_engine as oe
from odin_engine.models.cifar_resnet import CifarResNet

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


class NotATensor:  # module level so that unsafe (pickle) loading can find it
    def __init__(self):
        self.value = 42


def _save_cifar_checkpoint(path: Path, depth: int = 20, prefix: str = "module.", drop_nbt: bool = True, seed=0):
    torch.manual_seed(seed)
    sd = CifarResNet(depth).state_dict()
    sd = {prefix + k: v for k, v in sd.items() if not (drop_nbt and k.endswith("num_batches_tracked"))}
    torch.save({"best_prec1": 91.0, "state_dict": sd}, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _save_cifar_checkpoint(tmp_path_factory.mktemp("w") / "resnet20.th")


@pytest.fixture(scope="module")
def model(ckpt):
    return oe.load_model("cifar_resnet20", ckpt)


@pytest.mark.parametrize("depth,params", [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018)])
def test_cifar_resnet_parameter_counts(depth, params):
    assert sum(p.numel() for p in CifarResNet(depth).parameters()) == params


def test_load_builtin_checkpoint_format(model, ckpt):
    assert model.num_classes == 10 and model.input_size == 32
    assert model.mean == oe.IMAGENET_MEAN and model.std == oe.IMAGENET_STD
    assert not model.module.training
    assert all(not p.requires_grad for p in model.module.parameters())
    sha = oe.loading.sha256_file(ckpt)
    assert model.model_id == f"cifar_resnet20@sha256:{sha[:16]}"
    assert oe.load_model("cifar_resnet20", ckpt).model_id == model.model_id  # stable


def test_mean_std_override_and_validation(ckpt):
    m = oe.load_model("cifar_resnet20", ckpt, mean="0.5,0.5,0.5", std=[0.25, 0.25, 0.25])
    assert m.mean == (0.5, 0.5, 0.5) and m.std == (0.25, 0.25, 0.25)
    with pytest.raises(oe.ConfigError, match="3 values"):
        oe.load_model("cifar_resnet20", ckpt, std="0.2,0.2")
    with pytest.raises(oe.ConfigError, match="> 0"):
        oe.load_model("cifar_resnet20", ckpt, std="0.2,0,0.2")


def test_pickled_checkpoint_refused_naming_the_opt_in(tmp_path):
    path = tmp_path / "pickled.th"
    torch.save({"state_dict": CifarResNet(20).state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(oe.CheckpointError, match="--unsafe-pickle"):
        oe.load_model("cifar_resnet20", path)
    assert oe.load_model("cifar_resnet20", path, unsafe_pickle=True).num_classes == 10


def test_mismatched_state_dict_lists_the_keys(tmp_path):
    sd = CifarResNet(20).state_dict()
    sd.pop("layer3.2.bn2.running_var")
    sd["head.weight"] = torch.zeros(3)
    sd["linear.weight"] = torch.zeros(5, 64)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(oe.CheckpointError) as err:
        oe.load_model("cifar_resnet20", tmp_path / "bad.pt")
    msg = str(err.value)
    assert "missing keys: layer3.2.bn2.running_var" in msg
    assert "unexpected keys: head.weight" in msg
    assert "linear.weight: checkpoint (5, 64) vs model (10, 64)" in msg
    # a 32-layer checkpoint does not fit a 20-layer model
    with pytest.raises(oe.CheckpointError, match="unexpected keys: layer1.3"):
        oe.load_model("cifar_resnet20", _save_cifar_checkpoint(tmp_path / "r32.th", depth=32))


def test_loader_configuration_errors(tmp_path, ckpt):
    with pytest.raises(oe.ConfigError, match="unknown model spec"):
        oe.load_model("resnet9000")
    with pytest.raises(oe.ConfigError, match="needs --weights"):
        oe.load_model("cifar_resnet20")
    with pytest.raises(oe.ConfigError, match="weights file not found"):
        oe.load_model("cifar_resnet20", tmp_path / "nope.th")
    (tmp_path / "garbage.th").write_bytes(b"not a checkpoint at all")
    with pytest.raises(oe.ConfigError, match="not a PyTorch checkpoint \\(starts with "):
        oe.load_model("cifar_resnet20", tmp_path / "garbage.th")
    with pytest.raises(oe.ConfigError, match="unknown torchvision classifier"):
        oe.load_model("torchvision:not_a_net", ckpt)
    with pytest.raises(oe.ConfigError, match="cannot import model factory"):
        oe.load_model("no_such_module_xyz:build")


def test_factory_spec_needs_normalization():
    spec = "odin_engine.models.cifar_resnet:CifarResNet"
    with pytest.raises(oe.ConfigError, match="no known input normalization.*--mean"):
        oe.load_model(spec)
    m = oe.load_model(spec, mean=(0.5,) * 3, std=(0.5,) * 3, input_size=32)
    assert m.num_classes == 10 and m.model_id.startswith(spec + "@sha256:")


def test_torchscript_spec(tmp_path):
    torch.manual_seed(0)
    scripted = torch.jit.script(CifarResNet(20).eval())
    scripted.save(str(tmp_path / "m.pt"))
    with pytest.raises(oe.ConfigError, match="no known input normalization"):
        oe.load_model(f"torchscript:{tmp_path / 'm.pt'}")
    m = oe.load_model(f"torchscript:{tmp_path / 'm.pt'}", mean=(0.5,) * 3, std=(0.5,) * 3, input_size=32)
    out = oe.OdinScorer(m).score(np.zeros((2, 32, 32, 3), np.uint8))
    assert out["odin"].shape == (2,)


def test_torchvision_spec_with_local_state_dict(tmp_path):
    import torchvision

    torch.save(torchvision.models.get_model("mobilenet_v3_small").state_dict(), tmp_path / "mnv3.pth")
    m = oe.load_model("torchvision:mobilenet_v3_small", tmp_path / "mnv3.pth")
    assert (m.num_classes, m.input_size, m.mean) == (1000, 224, oe.IMAGENET_MEAN)


def test_scorer_outputs_and_input_forms(model):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    scorer = oe.OdinScorer(model, temperature=1000.0, epsilon=0.0014, batch_size=2)
    out = scorer.score(imgs)
    assert set(out) == set(oe.SCORE_COLUMNS)
    assert all(v.shape == (5,) for v in out.values())
    assert out["pred"].dtype == np.int64
    assert np.all((out["msp"] > 0) & (out["msp"] <= 1)) and np.all((out["odin"] > 0) & (out["odin"] <= 1))
    as_tensor = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    again = scorer.score(as_tensor)
    for k in oe.SCORE_COLUMNS:
        np.testing.assert_allclose(out[k], again[k], rtol=1e-6)
    empty = scorer.score(np.zeros((0, 32, 32, 3), np.uint8))
    assert all(v.shape == (0,) for v in empty.values())
    with pytest.raises(ValueError, match="N×H×W×3"):
        scorer.score(np.zeros((2, 32, 32), np.uint8))


def test_optimized_module_matches_plain_module(model):
    imgs = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    # on the CPU: cuDNN's default TF32 convolutions would add their own rounding on a GPU
    fast = oe.OdinScorer(model, optimize=True, device="cpu").score(imgs)
    plain = oe.OdinScorer(model, optimize=False, device="cpu").score(imgs)
    np.testing.assert_array_equal(fast["pred"], plain["pred"])
    for k in ("msp", "max_logit", "energy", "odin"):
        np.testing.assert_allclose(fast[k], plain[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": 0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"epsilon": -0.1}, "epsilon"), ({"epsilon": 2.0}, "epsilon"), ({"autocast": "int8"}, "autocast"),
])
def test_scorer_rejects_bad_settings(model, kwargs, match):
    with pytest.raises(oe.ConfigError, match=match):
        oe.OdinScorer(model, **kwargs)


def test_score_grid_reuses_one_gradient_per_temperature(model):
    imgs = np.random.default_rng(2).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    temps, eps = [1.0, 1000.0], [0.0, 0.001, 0.004]
    scorer = oe.OdinScorer(model, batch_size=4)
    grid = scorer.score_grid(imgs, temps, eps)
    assert grid["odin"].shape == (2, 3, 6)
    for i, t in enumerate(temps):
        for j, e in enumerate(eps):
            single = oe.OdinScorer(model, temperature=t, epsilon=e, batch_size=4).score(imgs)["odin"]
            np.testing.assert_allclose(grid["odin"][i, j], single, rtol=1e-5)


def test_one_registry_with_the_four_methods(model):
    assert {"msp", "max_logit", "energy", "odin"} <= set(oe.REGISTRY)
    with pytest.raises(oe.ConfigError, match="unknown scoring method"):
        oe.get_method("mahalanobis_typo")
    with pytest.raises(ValueError, match="already registered"):
        oe.register(oe.REGISTRY["msp"])
    imgs = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    scorer = oe.OdinScorer(model, temperature=10.0, epsilon=0.002, optimize=False)
    together = scorer.score(imgs)
    x = next(scorer.batches(imgs))
    for name in ("msp", "max_logit", "energy", "odin"):
        alone = oe.get_method(name).fn(scorer.module, x, scorer.std.flatten(), temperature=10.0, epsilon=0.002)
        np.testing.assert_allclose(alone.cpu().numpy(), together[name], rtol=1e-5)
    assert oe.get_method("odin").needs_input_gradient and not oe.get_method("msp").needs_input_gradient


def test_engine_imports_no_ray():
    code = "import sys, odin_engine, odin_engine.metrics; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.testbed
@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data (the CIFAR-10 test bed) is not beside the repo")
def test_resnet20_accuracy_on_cifar10_jpeg_test_set():
    """PROVENANCE.md reports 81.03% on all 10,000; a stratified 2,000 must land near it."""
    d = np.load(DATA / "cifar10_test_jpeg_yoongikim.npz")
    idx = np.concatenate([np.arange(c * 1000, c * 1000 + 200) for c in range(10)])
    m = oe.load_model("cifar_resnet20", DATA / "weights" / "resnet20-12fca82f.th")
    pred = oe.OdinScorer(m, epsilon=0.0).score(d["images"][idx])["pred"]
    acc = float(np.mean(pred == d["labels"][idx]))
    assert 0.77 <= acc <= 0.85, acc
    assert collections.Counter(pred.tolist()).keys() == set(range(10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_scores_match_cpu(model):
    imgs = np.random.default_rng(4).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    cpu = oe.OdinScorer(model, device="cpu").score(imgs)
    gpu = oe.OdinScorer(model, device="cuda").score(imgs)
    np.testing.assert_array_equal(cpu["pred"], gpu["pred"])
    np.testing.assert_allclose(cpu["odin"], gpu["odin"], rtol=1e-3)
    bf16 = oe.OdinScorer(model, device="cuda", autocast="bf16").score(imgs)
    np.testing.assert_allclose(cpu["odin"], bf16["odin"], rtol=1e-2)
