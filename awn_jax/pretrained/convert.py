"""PyTorch checkpoints of the official AdderNet and the public CIFAR ResNet CNNs, converted
exactly into this project's models.

Two families of state_dicts (keys optionally prefixed ``module.`` by ``DataParallel``):

* ``addernet`` -- huawei-noah/AdderNet ``resnet20.py`` / ``resnet50.py``: multiplying stem
  ``conv1`` + ``bn1``; blocks ``layer{1..}.{j}`` with adder kernels ``conv{1,2,3}.adder`` and
  ``bn{1,2,3}``, projection shortcuts ``downsample.0.adder`` (1x1, padding 0) +
  ``downsample.1``; head ``fc`` (1x1 convolution; with a bias in ``resnet50.py``) + ``bn2``
  over the logits. This project's ``projection`` shortcut and ``conv-bn`` head; a bias of
  ``fc`` is folded into ``bn2``'s running mean (the BatchNorm subtracts it again in every
  mode, so the function is unchanged).
* ``pytorch_resnet_cifar10`` -- akamaster/pytorch_resnet_cifar10 ``resnet.py``: ``conv1`` +
  ``bn1``; blocks with multiplying ``conv{1,2}.weight`` and ``bn{1,2}``, the parameter-free
  "option A" shortcut; head ``linear`` (weight and bias). This project's ``option-a``
  shortcut and ``linear`` head.

Kernels go from PyTorch's ``(out, in, kh, kw)`` to HWIO; BatchNorm ``weight, bias,
running_mean, running_var`` to ``scale, bias, mean, var``. Reading a ``.pth`` file needs
PyTorch (``pip install -e '.[torch]'``); converting a state_dict of numpy arrays does not.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from awn_jax.data import DatasetInfo
from awn_jax.errors import UserError
from awn_jax.model import build_model, fill_named, named_leaves, split_model

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR10_INFO = DatasetInfo("cifar10", 10, (32, 32, 3), 50_000, 10_000,
                           (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), CIFAR10_CLASSES)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_INFO = DatasetInfo("imagenet2012", 1000, (224, 224, 3), 1_281_167, 50_000,
                            IMAGENET_MEAN, IMAGENET_STD)

_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# (blocks per stage, bottleneck) -> this project's architecture
_ARCHITECTURES = {((3, 3, 3), False): "resnet20", ((5, 5, 5), False): "resnet32",
                  ((9, 9, 9), False): "resnet56", ((2, 2, 2, 2), False): "resnet18",
                  ((3, 4, 6, 3), True): "resnet50"}


@dataclasses.dataclass(frozen=True)
class Family:
    """How one repository names and shapes its models."""

    name: str
    layer_type: str        # of the layers inside the blocks
    kernel: str            # the parameter name of a block layer's kernel
    shortcut: str
    head: str
    classifier: str        # torch name of the classifier's weight
    normalization: str     # the input constants (awn_jax.data.NORMALIZATIONS)


FAMILIES = {
    "addernet": Family("addernet", "adder", "adder", "projection", "conv-bn", "fc", "cifar10"),
    "pytorch_resnet_cifar10": Family("pytorch_resnet_cifar10", "conv", "weight", "option-a",
                                     "linear", "linear", "imagenet2012"),
}


class ConversionError(UserError):
    """A checkpoint that is not one of the known architectures, or cannot be read."""


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The arrays of a ``torch.save``d state_dict (or ``{"state_dict": ...}``), keys without
    the ``module.`` prefix. Needs PyTorch."""
    if not os.path.isfile(path):
        raise ConversionError(f"no such file: {path}")
    try:
        import torch
    except ImportError:
        raise ConversionError("reading a PyTorch checkpoint needs PyTorch: pip install -e "
                              "'.[torch]' (the CPU build is enough)") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    # torch.load raises many types for a damaged file (RuntimeError, EOFError,
    # UnpicklingError, zipfile errors): at this boundary each means "cannot be read".
    except Exception as error:  # noqa: BLE001
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise ConversionError(f"cannot read {path} as a PyTorch checkpoint "
                              f"({type(error).__name__}: {reason}): a truncated or damaged "
                              "file, or not a torch.save file") from error
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(hasattr(v, "numpy") for v in loaded.values()):
        raise ConversionError(f"{path} holds no state_dict (a dict of tensors)")
    return {key.removeprefix("module."): value.detach().cpu().numpy()
            for key, value in loaded.items()}


def detect(state_dict) -> tuple[Family, str]:
    """``(family, architecture)`` of a state_dict, from its names and shapes."""
    keys = set(state_dict)
    if any(k.endswith(".adder") for k in keys):
        family = FAMILIES["addernet"]
    elif "linear.weight" in keys:
        family = FAMILIES["pytorch_resnet_cifar10"]
    else:
        raise ConversionError(
            "not a checkpoint of a known architecture (the official AdderNet ResNets, with "
            "'.adder' kernels, or pytorch_resnet_cifar10's, with a 'linear' head); "
            f"its first keys: {sorted(keys)[:4]}")
    blocks = {}
    for key in keys:
        match = re.match(r"layer(\d+)\.(\d+)\.", key)
        if match:
            stage, block = int(match[1]), int(match[2])
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    sizes = tuple(blocks[s] for s in sorted(blocks))
    bottleneck = any(re.match(r"layer\d+\.\d+\.conv3\.", k) for k in keys)
    if (sizes, bottleneck) not in _ARCHITECTURES:
        raise ConversionError(f"a {family.name} checkpoint with {sizes} blocks per stage"
                              f"{' (bottleneck)' if bottleneck else ''}: no such architecture "
                              f"here (known: {sorted(_ARCHITECTURES.values())})")
    return family, _ARCHITECTURES[sizes, bottleneck]


def torch_name(name: str, family: Family) -> str:
    """The state_dict key of this project's leaf ``name`` (``stages.1.0.shortcut.conv.kernel``
    -> ``layer2.0.downsample.0.adder``)."""
    parts = name.split(".")
    if parts[0] == "stem_conv":
        return "conv1.weight"
    if parts[0] == "stem_bn":
        return "bn1." + _BN[parts[1]]
    if parts[0] == "classifier":
        return f"{family.classifier}.weight"
    if parts[0] == "classifier_bias":
        return f"{family.classifier}.bias"
    if parts[0] == "classifier_bn":
        return "bn2." + _BN[parts[1]]
    if parts[0] != "stages":
        raise ValueError(f"no PyTorch name for {name}")
    prefix = f"layer{int(parts[1]) + 1}.{parts[2]}"
    if parts[3] == "shortcut":
        return (f"{prefix}.downsample.0.{family.kernel}" if parts[4] == "conv"
                else f"{prefix}.downsample.1.{_BN[parts[5]]}")
    if parts[3].startswith("conv"):
        return f"{prefix}.{parts[3]}.{family.kernel}"
    return f"{prefix}.{parts[3]}.{_BN[parts[4]]}"


def _to_project(name: str, value: np.ndarray) -> np.ndarray:
    """PyTorch layout -> this project's: kernels OIHW -> HWIO, a linear (out, in) -> 1x1."""
    if name.endswith("kernel"):
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T[None, None]
    return value


def _to_torch(name: str, value: np.ndarray, family: Family) -> np.ndarray:
    if name.endswith("kernel"):
        if name.startswith("classifier") and family.head == "linear":
            return value[0, 0].T
        return value.transpose(3, 2, 0, 1)
    return value


def convert(state_dict, config):
    """``(config, info, graphdef, params, batch_stats)`` of the model a state_dict holds;
    ``config`` (e.g. ``configs/default.py``'s) gives the keys the checkpoint does not fix.
    One clear error for another architecture, missing or unexpected keys, wrong shapes."""
    family, architecture = detect(state_dict)
    config = config.copy_and_resolve_references()
    config.update(model=architecture, layer_type=family.layer_type, shortcut=family.shortcut,
                  head=family.head, normalization=family.normalization)
    imagenet = architecture in ("resnet18", "resnet50")
    config.update(dataset="imagenet2012" if imagenet else "cifar10",
                  image_size=224 if imagenet else 32)
    info = IMAGENET_INFO if imagenet else CIFAR10_INFO
    if family.normalization == "imagenet2012":
        info = dataclasses.replace(info, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    num_classes = state_dict[f"{family.classifier}.weight"].shape[0] if (
        f"{family.classifier}.weight" in state_dict) else info.num_classes
    info = dataclasses.replace(info, num_classes=num_classes,
                               class_names=info.class_names if num_classes == 10 else ())
    graphdef, params, batch_stats = split_model(build_model(config, info))

    state = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    folded_bias = None
    if family.head == "conv-bn" and f"{family.classifier}.bias" in state:
        folded_bias = np.asarray(state.pop(f"{family.classifier}.bias"))
    arrays, missing = {}, []
    for tree, prefix in ((params, "params/"), (batch_stats, "batch_stats/")):
        for name, leaf in named_leaves(tree).items():
            key = torch_name(name, family)
            if key not in state:
                missing.append(key)
                continue
            value = _to_project(name, np.asarray(state.pop(key)))
            if value.shape != np.shape(leaf):
                raise ConversionError(f"{key}: shape {value.shape} (as {name}) where the "
                                      f"{architecture} needs {np.shape(leaf)}")
            arrays[prefix + name] = value.astype(np.asarray(leaf).dtype)
    if missing:
        raise ConversionError(f"the state_dict lacks {len(missing)} of the {family.name} "
                              f"{architecture}'s entries, e.g. {missing[:3]}")
    if state:
        raise ConversionError(f"the state_dict has {len(state)} entries the {family.name} "
                              f"{architecture} does not, e.g. {sorted(state)[:3]}")
    if folded_bias is not None:  # BN(x + b) with mean m is BN(x) with mean m - b
        arrays["batch_stats/classifier_bn.mean"] = (
            arrays["batch_stats/classifier_bn.mean"] - folded_bias).astype(np.float32)
    params = fill_named(params, arrays, "params/")
    batch_stats = fill_named(batch_stats, arrays, "batch_stats/")
    return config, info, graphdef, params, batch_stats


def to_state_dict(params, batch_stats, family: Family) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert` (without ``module.`` prefixes or a folded bias)."""
    return {torch_name(name, family): _to_torch(name, np.asarray(value), family)
            for tree in (params, batch_stats) for name, value in named_leaves(tree).items()}


def batches_tracked(state_dict) -> int | None:
    """The largest ``num_batches_tracked`` (training steps seen), if the file has one."""
    counts = [int(v) for k, v in state_dict.items() if k.endswith("num_batches_tracked")]
    return max(counts) if counts else None
