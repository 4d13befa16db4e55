"""Importing PyTorch checkpoints (awn_jax.pretrained.convert, convert.py): logits against a
float64 PyTorch forward written here from the documented architectures, in every BN mode;
the ResNet-50 name mapping on a synthetic state_dict of the official names and shapes; the
one-line errors; the reference files' accuracies where ../shared/data is present."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from awn_jax.errors import UserError
from awn_jax.model import named_leaves
from awn_jax.pretrained import convert
from awn_jax.training.runs import Run
from configs import default

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = REPO_ROOT.parent / "shared" / "data" / "pretrained-reference"
MODES = ("tracked", "running-mean", "running")


def _torch():
    return pytest.importorskip(
        "torch", reason="comparing with PyTorch needs torch (pip install -e '.[torch]')")


def torch_logits(state_dict, images, mode, dtype="float64"):
    """A float64 PyTorch forward of a state_dict, written from the two repositories'
    documented architectures (pretrained-reference/README.md), ``mode`` as in BatchNorm:
    tracked (running statistics), running-mean (batch mean, running variance: the
    paper's -R), running (batch mean and biased variance)."""
    torch = _torch()
    import torch.nn.functional as F

    sd = {k: torch.tensor(np.asarray(v, dtype)) for k, v in state_dict.items()}
    adder = any(k.endswith(".adder") for k in sd)
    mean, std = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)) if adder else (
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x = torch.tensor(np.asarray(images, dtype)).permute(0, 3, 1, 2)
    x = (x - torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=x.dtype).view(1, 3, 1, 1)

    def bn(prefix, x):
        w, b = sd[f"{prefix}.weight"], sd[f"{prefix}.bias"]
        rm, rv = sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"]
        if mode == "tracked":
            return F.batch_norm(x, rm, rv, w, b, training=False, eps=1e-5)
        if mode == "running":
            return F.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
        centered = x - x.mean(dim=(0, 2, 3), keepdim=True)
        return centered / torch.sqrt(rv + 1e-5).view(1, -1, 1, 1) * w.view(1, -1, 1, 1) \
            + b.view(1, -1, 1, 1)

    def adder2d(x, w, stride, padding):  # -sum |x - w| over each window (Eq. 1)
        n, _, h, wd = x.shape
        cols = F.unfold(x, w.shape[-1], padding=padding, stride=stride)     # (N, C*k*k, L)
        out = -(cols.unsqueeze(1) - w.reshape(w.shape[0], -1, 1)).abs().sum(2)
        ho = (h + 2 * padding - w.shape[-1]) // stride + 1
        return out.reshape(n, w.shape[0], ho, -1)

    layer = adder2d if adder else (lambda x, w, s, p: F.conv2d(x, w, stride=s, padding=p))
    kernel = "adder" if adder else "weight"
    x = F.relu(bn("bn1", F.conv2d(x, sd["conv1.weight"], padding=1)))
    stage = 1
    while f"layer{stage}.0.bn1.weight" in sd:
        block = 0
        while f"layer{stage}.{block}.bn1.weight" in sd:
            p, s = f"layer{stage}.{block}", 2 if stage > 1 and block == 0 else 1
            out = F.relu(bn(f"{p}.bn1", layer(x, sd[f"{p}.conv1.{kernel}"], s, 1)))
            out = bn(f"{p}.bn2", layer(out, sd[f"{p}.conv2.{kernel}"], 1, 1))
            planes = out.shape[1]
            if f"{p}.downsample.0.adder" in sd:
                short = bn(f"{p}.downsample.1", adder2d(x, sd[f"{p}.downsample.0.adder"], s, 0))
            elif s != 1 or x.shape[1] != planes:  # option A
                short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
            else:
                short = x
            x = F.relu(out + short)
            block += 1
        stage += 1
    x = F.avg_pool2d(x, x.shape[-1])
    if adder:
        return bn("bn2", F.conv2d(x, sd["fc.weight"])).flatten(1).numpy()
    return F.linear(x.flatten(1), sd["linear.weight"], sd["linear.bias"]).numpy()


def _tolerance(reference, state_dict, images, mode):
    """What float32 can be held to: 1e-3 of the largest logit, or 4x the distance of
    PyTorch's own float32 forward from its float64 one. The official ResNet-20's adder
    outputs are sums of 576 terms reaching ~900 in size against a BN standard deviation of
    ~6: float32 rounding of a sum (measured 6e-4 at the first block, 1e-4 of a normalized
    unit) compounds over 19 layers to ~2e-4 of the logits, and the native kernel sums in
    another order than PyTorch's."""
    float32 = np.max(np.abs(torch_logits(state_dict, images, mode, "float32") - reference))
    return max(1e-3 * np.max(np.abs(reference)), 4 * float32)


def _check(state_dict, images, mode, ours):
    """``ours`` (float32) against the float64 PyTorch forward; returns the tolerance (PyTorch's
    own float32 forward, the slow part, only run when 1e-3 of the logits is not enough)."""
    reference = torch_logits(state_dict, images, mode)
    scale = np.max(np.abs(reference))
    if np.max(np.abs(ours - reference)) <= 1e-3 * scale:
        return 1e-3 * scale
    tolerance = _tolerance(reference, state_dict, images, mode)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=tolerance, err_msg=mode)
    return tolerance


def _random_state_dict(family, architecture, seed=0):
    """A state_dict of the family's names and shapes (through :func:`convert.to_state_dict`)
    of a random model: random BN affine parameters and a bias, and BN statistics
    re-estimated on random images so the activations stay in a realistic range."""
    from awn_jax import bn_statistics
    from awn_jax.distributed import make_mesh
    from awn_jax.model import build_model, fill_named, split_model

    config = default.get_config()
    config.update(model=architecture, layer_type=family.layer_type, shortcut=family.shortcut,
                  head=family.head, seed=seed)
    graphdef, params, stats = split_model(build_model(config, convert.CIFAR10_INFO))
    rng = np.random.default_rng(seed)
    params = fill_named(params, {
        name: (rng.uniform(0.5, 2.0, value.shape) if name.endswith(".scale") else
               rng.normal(0, 0.5, value.shape) if name.endswith("bias") else value)
        for name, value in named_leaves(params).items()})
    images = [_images(16, seed=seed + 10)]
    stats = bn_statistics.reestimate(graphdef, params, stats, lambda: iter(images),
                                     mesh=make_mesh(1))
    return {k: np.asarray(v, np.float32)
            for k, v in convert.to_state_dict(params, stats, family).items()}


def _images(n=8, seed=3):
    return np.random.default_rng(seed).random((n, 32, 32, 3), dtype=np.float32)


def _project_logits(state_dict, images, mode):
    config, info, graphdef, params, stats = convert.convert(state_dict, default.get_config())
    run = Run("t", config, None, 0, graphdef, params, stats)
    return np.asarray(run.logits_fn(mode)(images), np.float64)


@pytest.mark.parametrize("family, architecture", [
    ("addernet", "resnet20"), ("pytorch_resnet_cifar10", "resnet20"),
    ("pytorch_resnet_cifar10", "resnet32")])
def test_random_state_dicts_match_a_float64_torch_forward(family, architecture):
    _torch()
    sd = _random_state_dict(convert.FAMILIES[family], architecture)
    images = _images()
    for mode in MODES:
        _check(sd, images, mode, _project_logits(sd, images, mode))


@pytest.mark.parametrize("name", ["ResNet20-AdderNet.pth", "resnet20-12fca82f.th",
                                  "resnet32-d509ac18.th"])
def test_reference_checkpoints_match_a_float64_torch_forward(name):
    _torch()
    if not (REFERENCE / name).exists():
        pytest.skip(f"{REFERENCE / name} is not here (../shared/data/pretrained-reference)")
    sd = convert.read_state_dict(str(REFERENCE / name))
    sd.pop("num_batches_tracked", None)
    images = _images()
    without_counts = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    for mode in MODES:
        _check(without_counts, images, mode, _project_logits(sd, images, mode))


def test_the_comparison_sees_one_kernel_transposed():
    """One layer's kernel read with H and W swapped moves the logits 10x beyond the
    tolerance, and 1000x beyond the conversion's own error: the comparison can fail."""
    _torch()
    sd = _random_state_dict(convert.FAMILIES["addernet"], "resnet20")
    images = _images()
    reference = torch_logits(sd, images, "tracked")
    error = np.max(np.abs(_project_logits(sd, images, "tracked") - reference))
    swapped = {**sd, "layer2.1.conv1.adder": sd["layer2.1.conv1.adder"].transpose(0, 1, 3, 2)}
    gap = np.max(np.abs(_project_logits(swapped, images, "tracked") - reference))
    assert gap > 10 * _tolerance(reference, sd, images, "tracked")
    assert gap > 1000 * error


def _official_resnet50_state_dict():
    """The names and shapes of huawei-noah/AdderNet's ``resnet50.py`` (Bottleneck [3, 4, 6,
    3], adder 1x1/3x3/1x1, downsample adder 1x1 + BN, fc 1x1 convolution with a bias + bn2
    over 1000 logits), random values."""
    rng = np.random.default_rng(0)
    sd = {"conv1.weight": rng.normal(size=(64, 3, 7, 7))}

    def bn(prefix, n):
        sd.update({f"{prefix}.weight": rng.uniform(0.5, 2, n), f"{prefix}.bias": rng.normal(size=n),
                   f"{prefix}.running_mean": rng.normal(size=n),
                   f"{prefix}.running_var": rng.uniform(0.5, 2, n),
                   f"{prefix}.num_batches_tracked": np.asarray(5)})

    bn("bn1", 64)
    inplanes = 64
    for stage, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), 1):
        for block in range(blocks):
            p = f"module.layer{stage}.{block}"[len("module."):]
            sd[f"{p}.conv1.adder"] = rng.normal(size=(planes, inplanes, 1, 1))
            bn(f"{p}.bn1", planes)
            sd[f"{p}.conv2.adder"] = rng.normal(size=(planes, planes, 3, 3))
            bn(f"{p}.bn2", planes)
            sd[f"{p}.conv3.adder"] = rng.normal(size=(planes * 4, planes, 1, 1))
            bn(f"{p}.bn3", planes * 4)
            if block == 0:
                sd[f"{p}.downsample.0.adder"] = rng.normal(size=(planes * 4, inplanes, 1, 1))
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    sd["fc.weight"] = rng.normal(size=(1000, 2048, 1, 1))
    sd["fc.bias"] = rng.normal(size=1000)
    bn("bn2", 1000)
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def test_official_resnet50_names_round_trip():
    sd = _official_resnet50_state_dict()
    family, architecture = convert.detect(sd)
    assert (family.name, architecture) == ("addernet", "resnet50")
    config, info, _, params, stats = convert.convert(sd, default.get_config())
    assert (config.model, config.layer_type, info.num_classes, config.image_size) == (
        "resnet50", "adder", 1000, 224)
    back = convert.to_state_dict(params, stats, family)
    expected = {k: v for k, v in sd.items()
                if not k.endswith("num_batches_tracked") and k != "fc.bias"}
    assert set(back) == set(expected)
    for key, value in expected.items():
        if key == "bn2.running_mean":  # the fc bias is folded into it
            np.testing.assert_allclose(back[key], value - sd["fc.bias"], rtol=1e-6)
        else:
            np.testing.assert_array_equal(back[key], value, err_msg=key)
    assert len(named_leaves(params)) + len(named_leaves(stats)) == len(expected)


def test_a_linear_classifier_bias_before_bn_is_folded_exactly():
    """fc with a bias then BN: the converted model (bias folded into the running mean)
    gives the logits of the unfolded one in every mode, on a small AdderNet ResNet-20."""
    _torch()
    sd = _random_state_dict(convert.FAMILIES["addernet"], "resnet20")
    sd["fc.bias"] = np.random.default_rng(5).normal(0, 3, 10).astype(np.float32)
    images = _images()
    for mode in MODES:
        unfolded = dict(sd)
        bias = unfolded.pop("fc.bias")
        # torch side: the bias added to the fc output, i.e. shift the BN input
        _check({**unfolded, "bn2.running_mean": unfolded["bn2.running_mean"] - bias}, images,
               mode, _project_logits(sd, images, mode))


def test_errors_are_one_clear_line(tmp_path):
    sd = _random_state_dict(convert.FAMILIES["pytorch_resnet_cifar10"], "resnet20")
    with pytest.raises(UserError, match="not a checkpoint of a known architecture"):
        convert.detect({"features.0.weight": np.zeros((64, 3, 3, 3))})
    missing = {k: v for k, v in sd.items() if k != "layer2.1.bn1.running_var"}
    with pytest.raises(UserError, match=r"lacks 1 .* \['layer2.1.bn1.running_var'\]"):
        convert.convert(missing, default.get_config())
    with pytest.raises(UserError, match="entries the pytorch_resnet_cifar10 resnet20 does not"):
        convert.convert({**sd, "extra.weight": np.zeros(3)}, default.get_config())
    wrong = {**sd, "layer1.0.conv1.weight": np.zeros((16, 16, 5, 5), np.float32)}
    with pytest.raises(UserError, match=r"layer1.0.conv1.weight: shape \(5, 5, 16, 16\)"):
        convert.convert(wrong, default.get_config())
    with pytest.raises(UserError, match="blocks per stage"):
        convert.detect({k: v for k, v in sd.items() if not k.startswith("layer3.2")})
    with pytest.raises(UserError, match="no such file"):
        convert.read_state_dict(str(tmp_path / "none.pth"))


def _convert_cli(*args):
    return subprocess.run([sys.executable, "convert.py", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


def test_cli_converts_and_rejects_bad_files(tmp_path):
    torch = _torch()
    sd = _random_state_dict(convert.FAMILIES["pytorch_resnet_cifar10"], "resnet20")
    path = tmp_path / "cnn.th"
    torch.save({"state_dict": {f"module.{k}": torch.tensor(v) for k, v in sd.items()},
                "best_prec1": 1.0}, path)
    out = tmp_path / "out"
    result = _convert_cli(path, "--name", "mine", "--output_dir", out)
    assert result.returncode == 0, result.stderr[-2000:]
    from awn_jax import pretrained
    run = pretrained.load("mine", directory=str(out))
    images = _images()
    _check(sd, images, "tracked", np.asarray(run.logits_fn("tracked")(images), np.float64))
    entry = pretrained.manifest(str(out))["mine"]
    assert entry["source"]["sha256"] == pretrained.file_sha256(str(path))
    assert entry["config"]["shortcut"] == "option-a" and entry["config"]["head"] == "linear"

    truncated = tmp_path / "truncated.th"
    truncated.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    other = tmp_path / "other.th"
    torch.save({"features.0.weight": torch.zeros(4, 3, 3, 3)}, other)
    partial = tmp_path / "partial.th"
    torch.save({k: torch.tensor(v) for k, v in sd.items() if k != "layer3.1.bn2.weight"},
               partial)
    for bad, message in ((truncated, "cannot read"), (other, "not a checkpoint of a known"),
                         (partial, "lacks")):
        result = _convert_cli(bad, "--name", "bad", "--output_dir", out)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr
    assert sorted(pretrained.manifest(str(out))) == ["mine"]  # nothing written for them
