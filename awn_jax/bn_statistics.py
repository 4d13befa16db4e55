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
  compiled to stop at the k-th BN. A model whose forward is a chain of segments
  (``model.segments()``: a ResNet's stem, blocks and head) keeps each segment's outputs
  once its BNs are done, and pass k starts from the input of the k-th BN's segment: L BNs
  cost about two forwards of the images instead of L/2 (the activations kept between
  segments are bounded by ``cache_bytes``; past it, every pass starts from the images).
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


def segments(model) -> list[Callable]:
    """``model``'s forward as a chain of functions of one array each: its ``segments()``
    (:meth:`awn_jax.nn.resnet.ResNet.segments`), else the whole forward as one."""
    return model.segments() if hasattr(model, "segments") else [model]


@dataclasses.dataclass(frozen=True)
class _Segment:
    """One segment of the forward: the BNs it calls, in order, as ``(name, values per
    channel per image)``, and the shape of one image's output."""

    layers: tuple[tuple[str, int], ...]
    output_shape: tuple[int, ...]


def _trace_segments(graphdef, params, batch_stats, image_shape, whole: bool) -> list[_Segment]:
    """The segments of the model's forward (one if ``whole``) and the BNs each calls."""
    traced = []

    def forward(params, batch_stats, images):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        path_of = bn_paths(model)
        x = images
        for segment in ([model] if whole else segments(model)):
            layers = []

            def record(module, inputs, y):
                layers.append((path_of[id(module)], int(np.prod(inputs.shape[1:-1]))))
                return y

            with intercept(record):
                x = segment(x)
            traced.append(_Segment(tuple(layers), tuple(x.shape[1:])))
        return x

    jax.eval_shape(forward, params, batch_stats,
                   jax.ShapeDtypeStruct((2, *image_shape), jnp.float32))
    names = [name for segment in traced for name, _ in segment.layers]
    if len(set(names)) != len(names):
        raise ValueError(f"a BatchNorm is called more than once per forward: {names}")
    return traced


def bn_layers(graphdef, params, batch_stats, image_shape) -> list[tuple[str, int]]:
    """``(name, values per channel per image)`` of the model's BatchNorms (``"stages.0.0.bn1"``,
    ``H * W`` of its input), in the order its forward calls them."""
    (whole,) = _trace_segments(graphdef, params, batch_stats, image_shape, whole=True)
    return list(whole.layers)


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


def _segment_of(model, index: int | None):
    """The segment ``index`` of ``model``'s forward, or its whole forward (``None``)."""
    return model if index is None else segments(model)[index]


def _shardings(mesh, split: bool):
    replicated = NamedSharding(mesh, PartitionSpec())
    return replicated, (NamedSharding(mesh, PartitionSpec("data")) if split else replicated)


@functools.lru_cache(maxsize=512)
def _moments_fn(graphdef, segment: int | None, name: str, mesh, split: bool):
    """A compiled ``(params, batch_stats, inputs) -> (mean, M2)``: the per-channel input mean
    of the BN ``name`` over the batch, and the sum of squared deviations from it, from the
    inputs of the forward's ``segment`` (``None``: the whole forward, from the images). Kept,
    so re-estimating another checkpoint of the same model compiles nothing."""
    def moments(params, batch_stats, inputs):
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
                _segment_of(model, segment)(inputs)
        except _Reached as reached:
            return reached.moments
        raise ValueError(f"the forward never called the BatchNorm {name}")

    replicated, batch = _shardings(mesh, split)
    return under_mesh(jax.jit(moments, in_shardings=(replicated, replicated, batch),
                              out_shardings=replicated), mesh)


@functools.lru_cache(maxsize=512)
def _segment_fn(graphdef, segment: int, mesh, split: bool):
    """A compiled ``(params, batch_stats, inputs) -> outputs`` of the forward's ``segment``."""
    def forward(params, batch_stats, inputs):
        return _segment_of(nnx.merge(graphdef, params, batch_stats, copy=True), segment)(inputs)

    replicated, batch = _shardings(mesh, split)
    return under_mesh(jax.jit(forward, in_shardings=(replicated, replicated, batch),
                              out_shardings=batch), mesh)


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


CACHE_BYTES = 4 << 30
"""The most that re-estimation keeps of the activations between segments (both sides of
one segment at once) before it falls back to forwards from the images for every BN."""


def reestimate(graphdef, params, batch_stats, batches: Callable[[], Iterable[np.ndarray]], *,
               source: str = "reestimate", mesh=None, show_progress: bool = False,
               cache_bytes: int = CACHE_BYTES):
    """New BN statistics for ``params`` (a tree like ``batch_stats``, of numpy arrays),
    re-estimated on the images of ``batches()`` (a fresh iterable of NHWC image batches in
    [0, 1] per call: it is read a few times, or once per BN layer past ``cache_bytes``).
    ``batch_stats`` supplies the structure and, for the layers not yet re-estimated, the
    values; it is not changed."""
    if source not in _FORWARD_MODE:
        raise UserError(f"cannot re-estimate {source!r} statistics; expected one of "
                        f"{', '.join(_FORWARD_MODE)}")
    sizes, image_shape = [], None  # one read of the batches for their sizes and shape
    for images in batches():
        sizes.append(len(images))
        image_shape = np.shape(images)[1:]
    if not sizes:
        raise UserError("re-estimating BN statistics needs at least one batch of images")
    mesh = make_mesh() if mesh is None else mesh
    graphdef = with_bn_mode(graphdef, params, batch_stats, _FORWARD_MODE[source])
    plan = _trace_segments(graphdef, params, batch_stats, image_shape, whole=False)
    largest = max((int(np.prod(segment.output_shape)) for segment in plan[:-1]), default=0)
    if 2 * 4 * largest * sum(sizes) > cache_bytes:  # float32, a segment's input and output
        plan = _trace_segments(graphdef, params, batch_stats, image_shape, whole=True)
    whole = len(plan) == 1
    stats = {name: np.asarray(value)
             for name, value in named_leaves(jax.device_get(batch_stats)).items()}
    progress = tqdm.tqdm(total=sum(len(segment.layers) for segment in plan),
                         desc="BN statistics", unit="layer", disable=not show_progress)

    def images():
        return (np.asarray(batch) for batch in batches())

    def split(x):  # shard a batch over the devices where it divides evenly
        return len(x) % mesh.devices.size == 0

    inputs = images
    for index, segment in enumerate(plan):
        for name, per_image in segment.layers:
            current = fill_named(batch_stats, stats)
            accumulator = _Accumulator()
            for x in inputs():
                moments = _moments_fn(graphdef, None if whole else index, name, mesh,
                                      split(x))(params, current, x)
                accumulator.add(len(x) * per_image, *jax.device_get(moments))
            mean, var = accumulator.statistics(source)
            for key, value in ((f"{name}.mean", mean), (f"{name}.var", var)):
                stats[key] = value.astype(stats[key].dtype)
            progress.update()
        if index < len(plan) - 1 and any(later.layers for later in plan[index + 1:]):
            current = fill_named(batch_stats, stats)
            outputs = [_segment_fn(graphdef, index, mesh, split(x))(params, current, x)
                       for x in inputs()]
            inputs = functools.partial(iter, outputs)
    progress.close()
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
