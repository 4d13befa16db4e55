"""Parity of the JAX ResNet-20 (CNN and AdderNet) and its optimizer with the official PyTorch code.

Not a test of the suite: torch is no dependency of the project. Run it with a Python that has
torch (CPU wheel) besides the project's packages, e.g. a venv made with
``--system-site-packages``::

    python bench/torch_parity.py                      # float64 and float32, conv and adder
    python bench/torch_parity.py --precision float64 --perturb weight-decay   # must FAIL

What it does, for each layer type (``conv``: the CNN baseline, ``adder``: AdderNet) and each
precision (a child process per precision: jax x64 is process-wide):

1. A plain PyTorch ResNet-20 as the official AdderNet ``resnet20.py`` defines it (stem conv 3->16
   + BN + ReLU, BasicBlock stages [3, 3, 3] of widths 16/32/64, stride-2 first blocks with 1x1
   stride-2 projection + BN, 8x8 average pool, 1x1 conv 64->10 without bias + BN), the adder
   layer written here as a custom autograd Function with the official rules (forward
   ``-sum |X - W|``; dW = sum g * (X - W), then ``eta * sqrt(numel) * dW / ||dW||``;
   dX = sum g * clip(W - X, -1, 1)), trained as the official ``main.py`` does:
   ``SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)``, CrossEntropyLoss, BN momentum 0.1.
2. The JAX model and optimizer exactly as the trainer makes them (``create_train_state`` with the
   CIFAR-10 config, the jitted ``training.loop.train_step``). Its initial kernels are copied into
   the torch model (HWIO -> OIHW); BatchNorm parameters and statistics are NOT copied: torch keeps
   its own (1, 0, 0, 1), so their initial values are compared too.
3. Compared: initial state; eval-mode (running statistics) and train-mode logits; the loss; the
   gradient of every parameter; then after each of ``--steps`` SGD steps (a new random batch
   each) the loss, every parameter, BN running mean/var and the momentum buffers; eval-mode
   logits after the last step. Per tensor: max |jax - torch| and that over max |torch|
   ("rel"); per group the maxima over its tensors. A check fails above the tolerance of its
   precision; the exit status is 1 if any failed.

Also: the multiplying kernels' initial distribution against torch's default Conv2d init and
the adder kernels' against N(0, 1) (Kolmogorov-Smirnov), and the crop/flip augmentation
(``awn_jax.data.transforms.pad_crop_flip``) against torchvision's RandomCrop(32, padding=4)
+ RandomHorizontalFlip written with torch ops (zero pad, crop at (i, j) in 0..8, flip last axis)
for all 81 offsets and both flips, plus the range of the offsets the data pipeline draws.

float64: the model's hard-coded float32 casts (``nn.batchnorm``, ``nn.resnet``, ``nn.layers``) are
redirected to float64 in this process only, and the config gets ``compute_dtype="float64"``;
nothing else of the project is changed. float32 is the project as it trains.

``--perturb`` makes the torch side deliberately wrong, to show the comparison detects it:
``weight-decay`` (5e-3 instead of 5e-4), ``kernel-hw`` (kernels copied with H and W swapped),
``eta`` (adder gradient scaling 0.1 instead of 0.2), ``bn-momentum`` (0.2 instead of 0.1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PERTURBATIONS = ("none", "weight-decay", "kernel-hw", "eta", "bn-momentum")
# rel tolerance (max |diff| / max |torch| per tensor) of every check, by precision
TOLERANCE = {"float64": 1e-9, "float32": 2e-3}
# float32 also passes within this factor of torch float32's own distance from torch float64
FLOOR_FACTOR = 10.0
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", choices=("both", "float64", "float32"), default="both")
    p.add_argument("--layer-types", default="conv,adder")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="images, labels and the model's seed")
    p.add_argument("--perturb", choices=PERTURBATIONS, default="none")
    p.add_argument("--json", default="", help="write the per-group numbers here")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# torch side: the official ResNet-20, written from its definition
# ----------------------------------------------------------------------------------------

def torch_model_module():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class AdderFunction(torch.autograd.Function):
        """Y[n, o, l] = -sum_k |X[n, k, l] - W[o, k]| on unfolded patches, official backward."""

        @staticmethod
        def forward(ctx, x_cols, w_cols, eta):
            ctx.save_for_backward(x_cols, w_cols)
            ctx.eta = eta
            return -(x_cols.unsqueeze(1) - w_cols[None, :, :, None]).abs().sum(2)

        @staticmethod
        def backward(ctx, g):
            x_cols, w_cols = ctx.saved_tensors
            x_minus_w = x_cols.unsqueeze(1) - w_cols[None, :, :, None]       # (N, O, K, L)
            g4 = g.unsqueeze(2)                                              # (N, O, 1, L)
            grad_w = (x_minus_w * g4).sum(dim=(0, 3))                        # full precision
            if ctx.eta is not None:                                          # adaptive scaling
                grad_w = (ctx.eta * math.sqrt(grad_w.numel()) * grad_w
                          / grad_w.norm(p=2).clamp(min=1e-12))
            grad_x = ((-x_minus_w).clamp(-1, 1) * g4).sum(dim=1)             # HardTanh
            return grad_x, grad_w, None

    class Adder2d(nn.Module):
        def __init__(self, cin, cout, k, stride=1, padding=0, eta=0.2):
            super().__init__()
            self.stride, self.padding, self.k, self.eta = stride, padding, k, eta
            self.adder = nn.Parameter(torch.randn(cout, cin, k, k))

        def forward(self, x):
            n, _, h, w = x.shape
            ho = (h + 2 * self.padding - self.k) // self.stride + 1
            wo = (w + 2 * self.padding - self.k) // self.stride + 1
            cols = F.unfold(x, self.k, padding=self.padding, stride=self.stride)  # (N, C*k*k, L)
            out = AdderFunction.apply(cols, self.adder.reshape(self.adder.shape[0], -1), self.eta)
            return out.reshape(n, -1, ho, wo)

    def layer(layer_type, cin, cout, k, stride, padding, eta):
        if layer_type == "adder":
            return Adder2d(cin, cout, k, stride, padding, eta)
        return nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)

    class BasicBlock(nn.Module):
        def __init__(self, layer_type, inplanes, planes, stride, downsample, eta):
            super().__init__()
            self.conv1 = layer(layer_type, inplanes, planes, 3, stride, 1, eta)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = layer(layer_type, planes, planes, 3, 1, 1, eta)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            residual = x if self.downsample is None else self.downsample(x)
            return F.relu(out + residual)

    class ResNet20(nn.Module):
        def __init__(self, layer_type, num_classes=10, eta=0.2, mean=CIFAR10_MEAN,
                     std=CIFAR10_STD):
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
            self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            inplanes = 16
            for index, planes in enumerate((16, 32, 64)):
                stride = 1 if index == 0 else 2
                blocks = []
                for b in range(3):
                    s = stride if b == 0 else 1
                    down = None
                    if s != 1 or inplanes != planes:
                        down = nn.Sequential(layer(layer_type, inplanes, planes, 1, s, 0, eta),
                                             nn.BatchNorm2d(planes))
                    blocks.append(BasicBlock(layer_type, inplanes, planes, s, down, eta))
                    inplanes = planes
                setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
            self.avgpool = nn.AvgPool2d(8, stride=1)
            self.fc = nn.Conv2d(64, num_classes, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(num_classes)
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.data.fill_(1)
                    m.bias.data.zero_()

        def forward(self, images):  # NCHW in [0, 1]; normalized as main.py's transform does
            x = (images - self.mean) / self.std
            x = F.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            x = self.bn2(self.fc(self.avgpool(x)))
            return x.view(x.size(0), -1)

    return ResNet20


def torch_name(jax_name: str, layer_type: str) -> str:
    """``stages.1.0.shortcut.conv.kernel`` -> ``layer2.0.downsample.0.adder`` etc."""
    parts = jax_name.split(".")
    leaf = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    if parts[0] == "stem_conv":
        return "conv1.weight"
    if parts[0] == "stem_bn":
        return "bn1." + leaf[parts[1]]
    if parts[0] == "classifier":
        return "fc.weight"
    if parts[0] == "classifier_bn":
        return "bn2." + leaf[parts[1]]
    assert parts[0] == "stages", jax_name
    prefix = f"layer{int(parts[1]) + 1}.{parts[2]}"
    kernel = "adder" if layer_type == "adder" else "weight"
    if parts[3] == "shortcut":
        return f"{prefix}.downsample.{0 if parts[4] == 'conv' else 1}." + (
            kernel if parts[4] == "conv" else leaf[parts[5]])
    if parts[3] in ("conv1", "conv2"):
        return f"{prefix}.{parts[3]}.{kernel}"
    return f"{prefix}.{parts[3]}.{leaf[parts[4]]}"


def group_of(jax_name: str) -> str:
    if jax_name.endswith(".kernel"):
        if jax_name.startswith("stem_conv"):
            return "kernel: stem conv"
        if jax_name.startswith("classifier"):
            return "kernel: classifier conv"
        if ".shortcut." in jax_name:
            return "kernel: shortcut 1x1"
        return "kernel: block 3x3"
    return {"scale": "BN scale", "bias": "BN bias", "mean": "BN running mean",
            "var": "BN running var"}[jax_name.rsplit(".", 1)[-1]]


# ----------------------------------------------------------------------------------------
# comparison bookkeeping
# ----------------------------------------------------------------------------------------

class Report:
    """Per tensor: max |a - b| and that over max |b| ("rel"); per group the maxima."""

    def __init__(self, precision, tolerance):
        self.precision, self.tolerance = precision, tolerance
        self.rows = []  # dicts: layer_type, stage, group, tensors, abs, rel, ..., ok
        self.failed = 0

    @staticmethod
    def _groups(pairs):
        import numpy as np
        groups = {}
        for name, (a, b) in pairs.items():
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert a.shape == b.shape, (name, a.shape, b.shape)
            diff = float(np.max(np.abs(a - b)))
            scale = float(np.max(np.abs(b)))
            rel = diff / max(scale, 1e-300)
            g = groups.setdefault(group_of(name) if "." in name else name, [0.0, 0.0, 0, 0.0])
            g[0], g[1], g[2], g[3] = max(g[0], diff), max(g[1], rel), g[2] + 1, max(g[3], scale)
        return groups

    def _record(self, ok, text, **row):
        self.failed += not ok
        self.rows.append(dict(row, ok=ok))
        print(f"  {row['stage']:<24} {row['group']:<24} n={row['tensors']:<3} {text}"
              f"{'' if ok else '   <-- FAIL'}", flush=True)

    def compare(self, layer_type, stage, pairs):
        """pairs: {name: (jax_array, torch_array)}, same layout and precision."""
        for group, (diff, rel, count, scale) in sorted(self._groups(pairs).items()):
            self._record(rel <= self.tolerance,
                         f"max|torch|={scale:.3e} max|d|={diff:.3e} rel={rel:.3e}",
                         layer_type=layer_type, stage=stage, group=group, tensors=count,
                         abs=diff, rel=rel, max_torch=scale)

    def compare_to_floor(self, layer_type, stage, same, against64, floor):
        """float32: jax32 vs torch32 (``same``), jax32 vs torch64 and torch32 vs torch64
        (``floor``, what float32 rounding alone does here). Passes if jax32 agrees with
        torch32 within the tolerance, or is no farther from torch64 than FLOOR_FACTOR times
        torch32's own distance from it."""
        same, against64, floor = (self._groups(x) for x in (same, against64, floor))
        for group in sorted(same):
            diff, rel, count, scale = same[group]
            rel64, floor_rel = against64[group][1], floor[group][1]
            ok = rel <= self.tolerance or rel64 <= FLOOR_FACTOR * max(floor_rel, 1e-7)
            self._record(ok, f"max|torch|={scale:.3e} max|d|={diff:.3e} rel={rel:.3e} | "
                         f"vs torch64 {rel64:.3e}, torch32 vs torch64 {floor_rel:.3e}",
                         layer_type=layer_type, stage=stage, group=group, tensors=count,
                         abs=diff, rel=rel, max_torch=scale, rel_vs_torch64=rel64,
                         torch32_vs_torch64=floor_rel)


# ----------------------------------------------------------------------------------------
# one precision, in its own process
# ----------------------------------------------------------------------------------------

class _Float64Numpy:
    """``jax.numpy`` with ``float32`` meaning ``float64``: stands in for the module global
    ``jnp`` of the model's files so their hard-coded float32 casts keep float64."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return self._module.float64 if name == "float32" else getattr(self._module, name)


def run_precision(args) -> int:
    precision = args.precision
    import jax
    jax.config.update("jax_enable_x64", precision == "float64")
    import numpy as np
    import torch

    import awn_jax.model
    import awn_jax.nn.batchnorm
    import awn_jax.nn.layers
    import awn_jax.nn.resnet
    from awn_jax.data import DatasetInfo
    from awn_jax.ops.adder import resolve_implementation

    jnp = jax.numpy
    if precision == "float64":
        for module in (awn_jax.nn.batchnorm, awn_jax.nn.layers, awn_jax.nn.resnet):
            module.jnp = _Float64Numpy(jnp)
        awn_jax.model.COMPUTE_DTYPES["float64"] = jnp.float64
    np_dtype = np.float64 if precision == "float64" else np.float32
    torch.set_default_dtype(torch.float64 if precision == "float64" else torch.float32)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    report = Report(precision, TOLERANCE[precision])
    print(f"== precision {precision}: jax {jax.__version__} (x64={jax.config.jax_enable_x64}), "
          f"torch {torch.__version__}, adder implementation {resolve_implementation()!r}, "
          f"perturb={args.perturb}, tolerance rel {report.tolerance:g}", flush=True)

    info = DatasetInfo(name="cifar10", num_classes=10, image_shape=(32, 32, 3), num_train=50000,
                       num_test=10000, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    rng = np.random.default_rng(args.seed)
    batches = [{"image": rng.uniform(0.0, 1.0, (args.batch, 32, 32, 3)).astype(np_dtype),
                "label": rng.integers(0, 10, args.batch).astype(np.int32)}
               for _ in range(args.steps)]
    init_failures = check_init_distributions() if precision == "float32" else 0
    # float32 rounding is amplified through train-mode BN on 8 images: torch float32 against
    # torch float64 from the same start measures that floor; JAX float32 must stay near it.
    references = (("torch", precision),) if precision == "float64" else (
        ("torch", "float32"), ("torch", "float64"))

    for layer_type in args.layer_types.split(","):
        print(f"-- layer_type {layer_type}", flush=True)
        jax_run, kernels = run_jax(args, layer_type, info, batches, precision)
        runs = {ref: run_torch(args, layer_type, kernels, batches, ref[1]) for ref in references}
        torch_same = runs["torch", precision]
        for stage in jax_run:
            pairs = {n: (v, torch_same[stage][n]) for n, v in jax_run[stage].items()}
            if precision == "float64":
                report.compare(layer_type, stage, pairs)
                continue
            torch64 = runs["torch", "float64"][stage]
            floor = {n: (torch_same[stage][n], torch64[n]) for n in jax_run[stage]}
            against64 = {n: (v, torch64[n]) for n, v in jax_run[stage].items()}
            report.compare_to_floor(layer_type, stage, pairs, against64, floor)

    failed = report.failed + init_failures
    if precision == "float32":
        failed += check_augmentation()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"precision": precision, "perturb": args.perturb,
                       "tolerance": report.tolerance, "rows": report.rows, "failed": failed}, f,
                      indent=1)
    print(f"== precision {precision}: {len(report.rows)} group comparisons, {failed} failed",
          flush=True)
    return int(failed > 0)


def run_jax(args, layer_type, info, batches, precision):
    """The project's model and train step: ``({stage: {name: array}}, initial kernels)``."""
    import functools

    import jax
    import numpy as np
    import optax

    from awn_jax.training import optimizer
    from awn_jax.model import apply_model, cross_entropy, named_leaves, with_bn_mode
    from awn_jax.training.loop import train_step
    from awn_jax.training.state import create_train_state
    from configs import cifar10_r20_ann, cifar10_r20_cnn

    config = (cifar10_r20_cnn if layer_type == "conv" else cifar10_r20_ann).get_config()
    config.seed = args.seed
    if precision == "float64":
        config.compute_dtype = "float64"
    steps_per_epoch = info.num_train // 256  # the official batch of 256
    graphdef, tx, state = create_train_state(config, info, steps_per_epoch)
    lrs = [float(optimizer.learning_rate_schedule(config, steps_per_epoch)(s))
           for s in range(args.steps)]
    print(f"  jax: lr of steps 0..{args.steps - 1} = {lrs}, weight_decay={config.weight_decay}, "
          f"momentum={config.momentum}, eta={config.eta}, "
          f"param dtype {jax.tree.leaves(state.params)[0].dtype}", flush=True)
    step = jax.jit(functools.partial(train_step, graphdef, tx))
    get = lambda tree: {n: np.asarray(v) for n, v in named_leaves(tree).items()}
    out = {"initial params": get(state.params), "initial BN stats": get(state.batch_stats)}
    kernels = {n: v for n, v in out["initial params"].items() if n.endswith(".kernel")}

    def eval_logits(state):
        eval_graphdef = with_bn_mode(graphdef, state.params, state.batch_stats, "tracked")
        return np.asarray(apply_model(eval_graphdef, state.params, state.batch_stats,
                                      batches[0]["image"])[0])

    out["eval logits, start"] = {"logits": eval_logits(state)}

    def loss_fn(params, batch_stats, batch):  # as training.loop.train_step's
        logits, batch_stats = apply_model(graphdef, params, batch_stats, batch["image"])
        return cross_entropy(logits, batch["label"]), (logits, batch_stats)

    (loss, (logits, _)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        state.params, state.batch_stats, batches[0])
    out["train logits"] = {"logits": np.asarray(logits)}
    out["loss"] = {"loss": np.asarray(loss)}
    out["gradients"] = get(grads)
    for k, batch in enumerate(batches):
        state, metrics = step(state, batch)
        out[f"loss of step {k + 1}"] = {"loss": np.asarray(metrics["loss"])}
        out[f"after step {k + 1}: params"] = get(state.params)
        out[f"after step {k + 1}: BN stats"] = get(state.batch_stats)
        trace = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: isinstance(
            s, optax.TraceState)) if isinstance(s, optax.TraceState)]
        assert len(trace) == 1, state.opt_state
        out[f"after step {k + 1}: momentum"] = get(trace[0].trace)
    out[f"eval logits, step {len(batches)}"] = {"logits": eval_logits(state)}
    return out, kernels


def run_torch(args, layer_type, kernels, batches, precision):
    """The official model and loop in torch, from the JAX kernels: ``{stage: {name: array}}``
    in JAX's layout and names."""
    import numpy as np
    import torch

    dtype = torch.float64 if precision == "float64" else torch.float32
    eta = 0.1 if args.perturb == "eta" else 0.2
    model = torch_model_module()(layer_type, eta=eta).to(dtype)
    if args.perturb == "bn-momentum":
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.2
    tstate = dict(model.named_parameters()) | dict(model.named_buffers())
    hw_order = (3, 2, 1, 0) if args.perturb == "kernel-hw" else (3, 2, 0, 1)
    with torch.no_grad():
        for name, value in kernels.items():
            tstate[torch_name(name, layer_type)].copy_(torch.from_numpy(
                np.ascontiguousarray(np.transpose(value, hw_order))))
    wd = 5e-3 if args.perturb == "weight-decay" else 5e-4
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=wd)
    criterion = torch.nn.CrossEntropyLoss()
    names = {"params": [n for n in _jax_names(layer_type) if n.rsplit(".", 1)[-1]
                        in ("kernel", "scale", "bias")],
             "stats": [n for n in _jax_names(layer_type) if n.rsplit(".", 1)[-1]
                       in ("mean", "var")]}

    def layout(name, tensor):
        a = tensor.detach().cpu().numpy().copy()  # a snapshot: SGD updates in place
        return np.transpose(a, (2, 3, 1, 0)) if name.endswith(".kernel") else a

    def get(kind, attr=None):
        out = {}
        for n in names[kind]:
            t = tstate[torch_name(n, layer_type)]
            out[n] = layout(n, t if attr is None else attr(t))
        return out

    def nchw(images):
        return torch.from_numpy(np.ascontiguousarray(np.transpose(images, (0, 3, 1, 2)))).to(dtype)

    out = {"initial params": get("params"), "initial BN stats": get("stats")}
    model.eval()
    with torch.no_grad():
        out["eval logits, start"] = {"logits": model(nchw(batches[0]["image"])).numpy()}
    model.train()
    for k, batch in enumerate(batches):  # main.py's loop
        opt.zero_grad()
        logits = model(nchw(batch["image"]))
        loss = criterion(logits, torch.from_numpy(batch["label"]).long())
        loss.backward()
        if k == 0:
            out["train logits"] = {"logits": logits.detach().numpy()}
            out["loss"] = {"loss": np.asarray(loss.item())}
            out["gradients"] = get("params", lambda t: t.grad)
        opt.step()
        out[f"loss of step {k + 1}"] = {"loss": np.asarray(loss.item())}
        out[f"after step {k + 1}: params"] = get("params")
        out[f"after step {k + 1}: BN stats"] = get("stats")
        out[f"after step {k + 1}: momentum"] = get(
            "params", lambda t: opt.state[t]["momentum_buffer"])
    model.eval()
    with torch.no_grad():
        out[f"eval logits, step {len(batches)}"] = {
            "logits": model(nchw(batches[0]["image"])).numpy()}
    return out


def _jax_names(layer_type):
    """Every parameter and BN statistic of the JAX ResNet-20, by ``named_leaves`` name."""
    names = ["stem_conv.kernel", "stem_bn.scale", "stem_bn.bias", "stem_bn.mean", "stem_bn.var",
             "classifier.kernel"] + [f"classifier_bn.{x}" for x in ("scale", "bias", "mean", "var")]
    for stage in range(3):
        for block in range(3):
            prefix = f"stages.{stage}.{block}"
            names += [f"{prefix}.conv1.kernel", f"{prefix}.conv2.kernel"]
            names += [f"{prefix}.{bn}.{x}" for bn in ("bn1", "bn2")
                      for x in ("scale", "bias", "mean", "var")]
            if stage > 0 and block == 0:
                names += [f"{prefix}.shortcut.conv.kernel"] + [
                    f"{prefix}.shortcut.bn.{x}" for x in ("scale", "bias", "mean", "var")]
    return names


def check_init_distributions() -> int:
    """The JAX initial kernels against torch's own initializers, seed by seed: multiplying
    kernels against ``nn.Conv2d``'s default (bounds and KS between samples), adder kernels
    against N(0, 1)."""
    import numpy as np
    import scipy.stats
    import torch

    from awn_jax.data import DatasetInfo
    from awn_jax.model import build_model, named_leaves, split_model
    from configs import cifar10_r20_ann, cifar10_r20_cnn

    info = DatasetInfo(name="cifar10", num_classes=10, image_shape=(32, 32, 3), num_train=50000,
                       num_test=10000, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    failed = 0
    print("-- initial distributions (5 seeds pooled)", flush=True)
    pooled = {}
    for layer_type, cfg in (("conv", cifar10_r20_cnn), ("adder", cifar10_r20_ann)):
        for seed in range(5):
            config = cfg.get_config()
            config.seed = seed
            _, params, _ = split_model(build_model(config, info))
            for name, v in named_leaves(params).items():
                if name.endswith(".kernel"):
                    kind = ("adder" if layer_type == "adder" and not name.startswith(
                        ("stem_conv", "classifier")) else "conv")
                    key = (layer_type, kind, tuple(np.shape(v)))
                    pooled.setdefault(key, []).append(np.ravel(np.asarray(v)))
    for (layer_type, kind, shape), samples in sorted(pooled.items()):
        sample = np.concatenate(samples)
        if kind == "conv":
            kh, kw, cin, cout = shape
            ref = np.concatenate([torch.nn.Conv2d(cin, cout, kh, bias=False).weight.detach()
                                  .double().numpy().ravel() for _ in range(5)])
            bound = 1 / math.sqrt(kh * kw * cin)
            p = scipy.stats.ks_2samp(sample, ref).pvalue
            ok = np.max(np.abs(sample)) <= bound * (1 + 1e-6) and p > 1e-3
            text = (f"max|w|={np.max(np.abs(sample)):.4f} (torch bound {bound:.4f}, torch sample "
                    f"{np.max(np.abs(ref)):.4f}), std={sample.std():.4f} vs torch {ref.std():.4f}, "
                    f"KS p={p:.3f}")
        else:
            p = scipy.stats.kstest(sample, "norm").pvalue
            ok = abs(sample.mean()) < 5 / math.sqrt(sample.size) and p > 1e-3
            text = f"mean={sample.mean():+.4f} std={sample.std():.4f}, KS vs N(0,1) p={p:.3f}"
        failed += not ok
        print(f"  {layer_type:<5} {kind:<5} {shape!s:<16} n={sample.size:<6} {text}"
              f"{'' if ok else '   <-- FAIL'}", flush=True)
    return failed


def check_augmentation() -> int:
    """pad_crop_flip against torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip,
    written with torch ops as torchvision defines them for tensors: F.pad(img, 4) with
    fill 0 (constant), crop img[..., i:i+32, j:j+32] with i, j = randint(0, 40 - 32 + 1),
    then flip of the last (width) axis with probability 0.5."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from awn_jax.data import pipeline, transforms

    print("-- augmentation", flush=True)
    rng = np.random.default_rng(1)
    images = rng.integers(1, 256, (1, 32, 32, 3), dtype=np.uint8)  # no zero pixels: pads show
    mismatches = 0
    for i in range(9):
        for j in range(9):
            for flip in (False, True):
                ours = transforms.pad_crop_flip(images, np.array([[i, j]]), np.array([flip]), 4)
                t = torch.from_numpy(images).permute(0, 3, 1, 2)
                t = F.pad(t, (4, 4, 4, 4), mode="constant", value=0)[..., i:i + 32, j:j + 32]
                if flip:
                    t = t.flip(-1)
                mismatches += not np.array_equal(ours, t.permute(0, 2, 3, 1).numpy())
    split = pipeline.ArraySplit(np.zeros((50000, 32, 32, 3), np.uint8),
                                np.zeros(50000, np.int64), crop_padding=4, random_flip=True)
    offsets, flips = split._epoch_draws(seed=0, epoch=0)
    counts = np.bincount(offsets.ravel(), minlength=9)
    ok_range = offsets.min() == 0 and offsets.max() == 8 and counts.min() > 0.9 * counts.mean()
    ok_flip = abs(flips.mean() - 0.5) < 0.01
    print(f"  pad_crop_flip vs torch pad+crop+flip: {mismatches} mismatches of 162 "
          f"(81 offsets x 2 flips)", flush=True)
    print(f"  pipeline draws (50000 images, epoch 0): offsets {offsets.min()}..{offsets.max()}, "
          f"counts per offset {counts.tolist()}, flip rate {flips.mean():.4f}", flush=True)
    return int(mismatches > 0) + int(not ok_range) + int(not ok_flip)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.precision != "both":
        return run_precision(args)
    status = 0
    for precision in ("float64", "float32"):
        argv_child = [a for a in (argv if argv is not None else sys.argv[1:])]
        child = [sys.executable, os.path.abspath(__file__), "--precision", precision,
                 *[a for a in _without(argv_child, "--precision")]]
        if args.json:
            root, ext = os.path.splitext(args.json)
            child = [*_without(child, "--json"), "--json", f"{root}_{precision}{ext or '.json'}"]
        status |= subprocess.call(child)
    print(f"== overall: {'PASS' if status == 0 else 'FAIL'}", flush=True)
    return status


def _without(argv, flag):
    """argv without ``flag VALUE`` / ``flag=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
