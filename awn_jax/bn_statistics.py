"""Re-estimated ("precise") BatchNorm statistics, stored beside the trained ones.

The running averages a model keeps from training estimate the statistics of augmented
training batches (zero-padded random crops widen the stem's input), under the training
forward (every BN normalized by its own batch). Evaluation meets clean images and, under
``tracked``/``running-mean``, stored statistics; "-R" then divides by variances that no
longer fit (docs/REPRODUCTION.md, "Why -R collapses"). Re-estimation replaces them by the
population statistics of a fixed set of training images, as "precise BN" does (Wu &
Johnson 2021, "Rethinking 'Batch' in BatchNorm", Sec. 3):

* layer by layer, in the order the forward calls them: the statistics of the k-th BN are
  those of its input when BNs 1..k-1 already use their new statistics, so every layer's
  statistics describe the inputs it will meet with the new model. Pass k runs a forward
  compiled to stop at the k-th BN, so L BNs cost about L/2 forwards of the images.
* ``reestimate``: the forward in ``tracked``; mean and variance are the population's,
  the variance unbiased over the ``N*H*W`` values of a channel (as the running variance
  is unbiased).
* ``reestimate-running-mean``: the forward in ``running-mean`` (the paper's "-R", Eq. 17);
  the variance is the mean of the unbiased within-batch variances at the evaluation batch
  size: what "-R" divides by is then the variance its own forward meets (the mean is the
  population's; "-R" does not use it).

Per-batch moments are float32 on the devices (the batch sharded over the mesh as in
training); they are combined in float64 on the host, so the result does not depend on how
batches are split over devices beyond float32 rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from awn_jax import paths
from awn_jax.distributed import make_mesh, under_mesh
from awn_jax.errors import UserError
from awn_jax.model import fill_named, named_leaves, with_bn_mode
from awn_jax.nn.batchnorm import BatchNorm, intercept

SOURCES = ("trained", "reestimate", "reestimate-running-mean")
"""``trained``: the running averages kept by training. ``reestimate``: population
statistics of the ``tracked`` forward. ``reestimate-running-mean``: statistics of the
``running-mean`` ("-R") forward itself."""

_FORWARD_MODE = {"reestimate": "tracked", "reestimate-running-mean": "running-mean"}


@dataclasses.dataclass(frozen=True)
class BNStats:
    """Which BatchNorm statistics a model is evaluated with.

    Attributes:
      source: one of :data:`SOURCES`.
      num_images: training images the statistics are re-estimated on (the first of a fixed
        order, the same for every run: ``Dataset.statistics_batches``).
      augment: with the training augmentation (pad-and-crop, flips), else clean images.
      batch_size: batches of the re-estimation; for ``reestimate-running-mean`` it is the
        evaluation batch the statistics are meant for.
      seed: the augmentation's draws.
    """

    source: str = "trained"
    num_images: int = 10_000
    augment: bool = False
    batch_size: int = 500
    seed: int = 0

    def __post_init__(self):
        if self.source not in SOURCES:
            raise UserError(f"unknown BN statistics {self.source!r}; expected one of "
                            f"{', '.join(SOURCES)}")
        if self.num_images < 2 or self.batch_size < 2:
            raise UserError(f"re-estimating BN statistics needs at least 2 images and "
                            f"batches of 2 or more, got {self.num_images} images in "
                            f"batches of {self.batch_size}")

    @property
    def reestimated(self) -> bool:
        return self.source != "trained"

    def label(self) -> str:
        """Short name for tables and file names, e.g. ``reestimate-10000``."""
        if not self.reestimated:
            return "trained"
        return f"{self.source}-{self.num_images}{'-aug' if self.augment else ''}"

    def describe(self) -> str:
        """One sentence for reports: where the statistics came from."""
        if not self.reestimated:
            return "BN statistics: the running averages kept by training"
        images = "augmented" if self.augment else "un-augmented"
        forward = _FORWARD_MODE[self.source]
        return (f"BN statistics: re-estimated on {self.num_images} {images} training images "
                f"under the `{forward}` forward, layer by layer (batches of "
                f"{self.batch_size})")


def bn_layers(graphdef, params, batch_stats, image_shape) -> list[tuple[str, int]]:
    """``(name, values per channel per image)`` of the model's BatchNorms (``"stages.0.0.bn1"``,
    ``H * W`` of its input), in the order its forward calls them."""
    layers = []

    def forward(params, batch_stats, images):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        path_of = bn_paths(model)

        def record(module, x, y):
            layers.append((path_of[id(module)], int(np.prod(x.shape[1:-1]))))
            return y

        with intercept(record):
            return model(images)

    jax.eval_shape(forward, params, batch_stats,
                   jax.ShapeDtypeStruct((2, *image_shape), jnp.float32))
    names = [name for name, _ in layers]
    if len(set(names)) != len(names):
        raise ValueError(f"a BatchNorm is called more than once per forward: {names}")
    return layers


def bn_paths(model) -> dict[int, str]:
    """``id(module) -> name`` of every BatchNorm in ``model``: what an interceptor
    (:func:`awn_jax.nn.batchnorm.intercept`) identifies the layer it is called with by."""
    return {id(module): ".".join(str(part) for part in path)
            for path, module in nnx.iter_graph(model) if isinstance(module, BatchNorm)}


class _Reached(Exception):
    """Raised while tracing, at the BN whose input moments are wanted: the forward after it
    is never traced, so the compiled program stops there."""

    def __init__(self, moments):
        super().__init__()
        self.moments = moments


@functools.lru_cache(maxsize=512)
def _moments_fn(graphdef, name: str, mesh, split: bool):
    """A compiled ``(params, batch_stats, images) -> (mean, M2)``: the per-channel input mean
    of the BN ``name`` over the batch, and the sum of squared deviations from it. Kept, so
    re-estimating another checkpoint of the same model compiles nothing."""
    def moments(params, batch_stats, images):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        path_of = bn_paths(model)

        def reach(module, x, y):
            if path_of[id(module)] == name:
                axes = tuple(range(x.ndim - 1))
                mean = jnp.mean(x, axis=axes)
                raise _Reached((mean, jnp.sum(jnp.square(x - mean), axis=axes)))
            return y

        try:
            with intercept(reach):
                model(images)
        except _Reached as reached:
            return reached.moments
        raise ValueError(f"the forward never called the BatchNorm {name}")

    replicated = NamedSharding(mesh, PartitionSpec())
    images = NamedSharding(mesh, PartitionSpec("data")) if split else replicated
    return under_mesh(jax.jit(moments, in_shardings=(replicated, replicated, images),
                              out_shardings=replicated), mesh)


class _Accumulator:
    """One channel vector's moments over batches, in float64 (Chan et al.'s combination)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0
        self.within, self.within_weight = 0.0, 0

    def add(self, count: int, mean, m2):
        mean, m2 = np.asarray(mean, np.float64), np.asarray(m2, np.float64)
        total = self.count + count
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + np.square(delta) * self.count * count / total
        self.mean = self.mean + delta * count / total
        self.count = total
        if count > 1:  # a batch of one value has no within-batch variance
            self.within = self.within + count * m2 / (count - 1)
            self.within_weight += count

    def statistics(self, source: str):
        """``(mean, variance)``: the population's, or for the "-R" forward the mean of the
        unbiased within-batch variances (weighted by batch size)."""
        if source == "reestimate":
            return self.mean, self.m2 / (self.count - 1)
        return self.mean, self.within / self.within_weight


def reestimate(graphdef, params, batch_stats, batches: Callable[[], Iterable[np.ndarray]], *,
               source: str = "reestimate", mesh=None, show_progress: bool = False):
    """New BN statistics for ``params`` (a tree like ``batch_stats``, of numpy arrays),
    re-estimated on the images of ``batches()`` (a fresh iterable of NHWC image batches in
    [0, 1] per call: it is read once per BN layer). ``batch_stats`` supplies the structure
    and, for the layers not yet re-estimated, the values; it is not changed."""
    if source not in _FORWARD_MODE:
        raise UserError(f"cannot re-estimate {source!r} statistics; expected one of "
                        f"{', '.join(_FORWARD_MODE)}")
    first = next(iter(batches()), None)
    if first is None:
        raise UserError("re-estimating BN statistics needs at least one batch of images")
    mesh = make_mesh() if mesh is None else mesh
    graphdef = with_bn_mode(graphdef, params, batch_stats, _FORWARD_MODE[source])
    layers = bn_layers(graphdef, params, batch_stats, np.shape(first)[1:])
    stats = {name: np.asarray(value)
             for name, value in named_leaves(jax.device_get(batch_stats)).items()}
    for name, per_image in tqdm.tqdm(layers, desc="BN statistics", unit="layer",
                                     disable=not show_progress):
        current = fill_named(batch_stats, stats)
        accumulator = _Accumulator()
        for images in batches():
            split = len(images) % mesh.devices.size == 0
            moments = _moments_fn(graphdef, name, mesh, split)(params, current,
                                                                np.asarray(images))
            accumulator.add(len(images) * per_image, *jax.device_get(moments))
        mean, var = accumulator.statistics(source)
        for key, value in ((f"{name}.mean", mean), (f"{name}.var", var)):
            stats[key] = value.astype(stats[key].dtype)
    return fill_named(batch_stats, stats)


def statistics_for_run(run, settings: BNStats, *, show_progress: bool = True):
    """``run``'s BN statistics re-estimated as ``settings`` asks (a
    :class:`awn_jax.training.runs.Run` with its training split), computed once and then read
    back: from ``<workdir>/bn_stats/`` for a training workdir, the user cache
    (:func:`awn_jax.paths.cache_dir`) for a shipped model. The file is keyed by the settings
    and the sha256 of the run's weights and trained statistics, which stay as they are."""
    if not settings.reestimated:
        return run.batch_stats
    if run.dataset is None:
        raise UserError(f"{run.workdir}: re-estimating BN statistics needs the training images "
                        "(pass the data directory, e.g. --data_dir)")
    key = json.dumps({"weights_sha256": run.weights_sha256, **dataclasses.asdict(settings)},
                     sort_keys=True)
    directory = (os.path.join(run.workdir, "bn_stats") if os.path.isdir(run.workdir)
                 else str(paths.cache_dir("bn_stats")))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = f"{os.path.basename(os.path.normpath(run.workdir)).replace(':', '-')}"
    path = os.path.join(directory, f"{stem}-epoch{run.epoch}-{settings.label()}-{digest}.npz")
    if os.path.exists(path):
        with np.load(path) as arrays:
            if str(arrays["key"]) == key:
                return fill_named(run.batch_stats, arrays, "batch_stats/")

    def batches():
        return (batch["image"] for batch in run.dataset.statistics_batches(
            settings.num_images, settings.batch_size, augment=settings.augment,
            seed=settings.seed))

    stats = reestimate(run.graphdef, run.params, run.batch_stats, batches,
                       source=settings.source, show_progress=show_progress)
    os.makedirs(directory, exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial.npz"
    np.savez(partial, key=np.asarray(key),
             **{f"batch_stats/{k}": v for k, v in named_leaves(stats).items()})
    os.replace(partial, path)
    return stats
