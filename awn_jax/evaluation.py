"""One evaluation loop: a model scored on batches of examples, with every BatchNorm in a
given mode and, optionally, after an attack, spread over the device mesh.

Training (the per-epoch test), the attack tables, the robustness studies and the stability
analyses all score through :class:`Evaluator`. Under ``running-mean`` and ``running`` an
image's logits depend on its batch mates, so the evaluation batch is the unit: the attack
is crafted and the images are scored inside the same batch. Batches are stacked into
chunks of ``(groups, batch, ...)`` and ``jax.vmap``-ed over the groups, each group with its
own batch statistics, so small batches still run as one large computation. Over several
devices a chunk is split by whole groups when they divide over the devices (each device
scores its own batches; nothing crosses devices), else by the examples of each batch
(XLA reduces the batch statistics across devices and the adder kernels run per shard, as
in training), else every device runs it whole. The numbers do not depend on the split.

An attack is any hashable callable ``attack(logits_fn, images, labels, key, *args)``
returning the adversarial images; ``args`` are traced (an eps sweep compiles once).
:class:`awn_jax.robustness.attacks.Attack` is the one the project uses.
:meth:`Evaluator.mates_logits` scores the batch-mate threat model of
:mod:`awn_jax.robustness.batch_attacks`: the attacker controls the first images of each
batch and is scored by the others.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from awn_jax.distributed import make_mesh, under_mesh
from awn_jax.errors import UserError
from awn_jax.model import apply_model, with_bn_mode
from awn_jax.nn.batchnorm import check_bn_modes

Attack = Callable[..., jax.Array]
SCORES = ("attacked", "mates")


@dataclasses.dataclass(frozen=True)
class Scoring:
    """What one evaluation scores, and so the key of its compiled program: the scored
    forward's BN mode; the attack (None: clean) and the BN mode it is crafted under (None:
    the same); how many images of each batch the attacker controls (None: all); whose logits
    come back, the attacker's images' (``attacked``) or their clean batch mates' (``mates``)."""

    bn_mode: str
    attack: Attack | None = None
    attacked: int | None = None
    score: str = "attacked"
    attack_bn_mode: str | None = None

    def __post_init__(self):
        check_bn_modes([self.bn_mode] + ([self.attack_bn_mode] if self.attack_bn_mode else []))
        if self.score not in SCORES:
            raise UserError(f"score must be 'attacked' or 'mates', got {self.score!r}")

    def for_batch(self, batch_size: int) -> Scoring:
        """This scoring checked against ``batch_size``, ``attacked`` None for a whole batch."""
        if self.score == "mates" and not (self.attacked is not None
                                          and 1 <= self.attacked < batch_size):
            raise UserError(f"scoring the mates needs attacked in [1, {batch_size - 1}], "
                            f"got {self.attacked}")
        if self.attacked is not None and not 1 <= self.attacked <= batch_size:
            raise UserError(f"attacked must be in [1, {batch_size}], got {self.attacked}")
        if self.attacked == batch_size:
            return dataclasses.replace(self, attacked=None)
        return self


class Evaluator:
    """Scores one model (``graphdef``, ``params``, ``batch_stats``); every method also takes
    other ``params``/``batch_stats`` of the same structure (interpolated models, epochs).

    One compilation per :class:`Scoring`, way of splitting over the devices, and shape.
    """

    def __init__(self, graphdef, params, batch_stats, *, mesh=None, chunk_size: int = 512):
        if chunk_size < 1:
            raise UserError(f"chunk_size must be >= 1, got {chunk_size}")
        self.graphdef, self.params, self.batch_stats = graphdef, params, batch_stats
        self.mesh = make_mesh() if mesh is None else mesh
        self.chunk_size = chunk_size
        self._graphdefs, self._compiled = {}, {}

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def _graphdef(self, bn_mode):
        if bn_mode not in self._graphdefs:
            self._graphdefs[bn_mode] = with_bn_mode(self.graphdef, self.params,
                                                    self.batch_stats, bn_mode)
        return self._graphdefs[bn_mode]

    def _sharding(self, spec):
        return NamedSharding(self.mesh, spec)

    # ------------------------------------------------------------------ loss and accuracy

    def loss_and_accuracy(self, batches: Iterable[dict], *, bn_mode: str, params=None,
                          batch_stats=None) -> dict:
        """Mean cross-entropy and accuracy over ``batches`` (dicts of this process's
        ``image`` and ``label``; on several hosts each process passes its own slice)."""
        check_bn_modes([bn_mode])
        params = self.params if params is None else params
        batch_stats = self.batch_stats if batch_stats is None else batch_stats
        loss_sum, correct, count = 0.0, 0, 0
        for batch in batches:
            size = len(batch["label"]) * jax.process_count()
            split = size % self.num_devices == 0
            if not split and jax.process_count() > 1:
                raise UserError(f"test batch of {size} does not split over "
                                f"{self.num_devices} devices; choose a batch size dividing "
                                "the test set")
            sharding = self._sharding(PartitionSpec("data") if split else PartitionSpec())
            images, labels = (jax.make_array_from_process_local_data(sharding, batch[k])
                              for k in ("image", "label"))
            sums = jax.device_get(self._summed(bn_mode)(params, batch_stats, images, labels))
            loss_sum, correct, count = (loss_sum + float(sums[0]), correct + int(sums[1]),
                                        count + size)
        if count == 0:
            raise UserError("no examples to evaluate")
        return {"test_loss": loss_sum / count, "test_accuracy": correct / count,
                "num_examples": count}

    def _summed(self, bn_mode):
        key = ("summed", bn_mode)
        if key not in self._compiled:
            graphdef = self._graphdef(bn_mode)

            def sums(params, batch_stats, images, labels):
                logits = apply_model(graphdef, params, batch_stats, images)[0]
                losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
                return jnp.sum(losses), jnp.sum(jnp.argmax(logits, -1) == labels)

            self._compiled[key] = under_mesh(jax.jit(
                sums, out_shardings=self._sharding(PartitionSpec())), self.mesh)
        return self._compiled[key]

    # ------------------------------------------------------------------ per-example logits

    def logits(self, images, labels, *, batch_size: int, bn_mode: str,
               attack: Attack | None = None, attack_args=(), attacked: int | None = None,
               attack_bn_mode: str | None = None, **run) -> np.ndarray:
        """Logits, shape ``(num_batches, k, num_classes)``: the batches are consecutive
        ``batch_size`` slices of ``images`` and ``k`` is ``attacked`` (the first ``k`` of
        each batch, the only ones attacked and scored) or the whole batch. The attack is
        crafted under ``attack_bn_mode`` (default: ``bn_mode``) with key
        ``fold_in(key, i)`` for batch ``i`` (``key`` defaults to ``jax.random.key(0)``).
        ``run``: ``key``, ``params``, ``batch_stats`` and ``on_batches(n)``, called after
        every compiled call with the number of batches it scored (progress bars)."""
        scoring = Scoring(bn_mode, attack, attacked, "attacked", attack_bn_mode)
        return self._logits(scoring, images, labels, batch_size, attack_args, **run)

    def mates_logits(self, images, labels, *, batch_size: int, attacked: int, bn_mode: str,
                     attack: Attack | None = None, attack_args=(), **run) -> np.ndarray:
        """The batch-mate threat model (:mod:`awn_jax.robustness.batch_attacks`): the first
        ``attacked`` images of each batch are the attacker's, and the logits returned are
        those of the other ``batch_size - attacked`` (clean) images, shape
        ``(num_batches, batch_size - attacked, num_classes)``. The attack gets
        ``logits_fn(x) ->`` those logits and their labels, ``x`` being the attacker's images
        (starting clean). ``run`` as for :meth:`logits`."""
        scoring = Scoring(bn_mode, attack, attacked, "mates")
        return self._logits(scoring, images, labels, batch_size, attack_args, **run)

    def _logits(self, scoring, images, labels, batch_size, attack_args, *, key=None,
                params=None, batch_stats=None, on_batches=None) -> np.ndarray:
        if jax.process_count() > 1:
            raise UserError("per-example evaluation runs on one host")
        if batch_size < 1 or len(images) % batch_size or not len(images):
            raise UserError(f"{len(images)} examples do not fill batches of {batch_size}")
        scoring = scoring.for_batch(batch_size)
        params = self.params if params is None else params
        batch_stats = self.batch_stats if batch_stats is None else batch_stats
        base = jax.random.key(0) if key is None else key
        attack_args = tuple(attack_args)
        num_batches = len(images) // batch_size
        groups = max(1, self.chunk_size // batch_size)
        if groups >= self.num_devices:
            groups -= groups % self.num_devices
        start, out = time.perf_counter(), []
        for first in range(0, num_batches, groups):
            count = min(groups, num_batches - first)
            split = ("groups" if count % self.num_devices == 0 else
                     "batch" if batch_size % self.num_devices == 0 else "whole")
            # Split by examples: one batch per call, its examples over the devices.
            calls = [(i, 1) for i in range(first, first + count)] if split == "batch" else [
                (first, count)]
            fn = self._per_batch(scoring, split)
            for index, size in calls:
                rows = slice(index * batch_size, (index + size) * batch_size)
                keys = jax.vmap(functools.partial(jax.random.fold_in, base))(
                    jnp.arange(index, index + size))
                out.append(np.asarray(fn(
                    params, batch_stats,
                    np.asarray(images[rows]).reshape(size, batch_size, *images.shape[1:]),
                    np.asarray(labels[rows]).reshape(size, batch_size), keys, attack_args)))
                if on_batches is not None:
                    on_batches(size)
        logging.info("%d examples, batch %d, %s: %.1f s", len(images), batch_size, scoring,
                     time.perf_counter() - start)
        return np.concatenate(out)

    def predictions(self, images, labels, *, mates: bool = False, **kwargs) -> np.ndarray:
        """Predicted classes of :meth:`logits` (``mates``: of :meth:`mates_logits`), shape
        ``(num_batches, k)``."""
        logits = self.mates_logits if mates else self.logits
        return np.argmax(logits(images, labels, **kwargs), axis=-1)

    def accuracy(self, images, labels, **kwargs) -> float:
        """Accuracy of :meth:`predictions` on the examples it scores."""
        predictions = self.predictions(images, labels, **kwargs)
        return float(np.mean(predictions == self.scored_labels(labels, **kwargs)))

    @staticmethod
    def scored_labels(labels, *, batch_size: int, attacked: int | None = None,
                      mates: bool = False, **_) -> np.ndarray:
        """The labels of the examples :meth:`predictions` scores, shaped like them."""
        batches = np.asarray(labels).reshape(-1, batch_size)
        k = batch_size if attacked is None else attacked
        return batches[:, k:] if mates else batches[:, :k]

    def _per_batch(self, scoring: Scoring, split: str):
        """The compiled program of ``scoring``; ``split``: how calls go over the devices,
        ``groups`` of batches, the examples of one ``batch``, or ``whole`` on each."""
        if (scoring, split) in self._compiled:
            return self._compiled[scoring, split]
        attack, attacked = scoring.attack, scoring.attacked
        score_graph = self._graphdef(scoring.bn_mode)
        attack_graph = self._graphdef(scoring.attack_bn_mode or scoring.bn_mode)

        def one_batch(params, batch_stats, images, labels, key, attack_args):
            k = images.shape[0] if attacked is None else attacked
            scored = slice(k, None) if scoring.score == "mates" else slice(0, k)

            def logits(graph, x):
                # The attacker's k images replace the first k of the clean batch.
                return apply_model(graph, params, batch_stats,
                                   images.at[:k].set(x))[0][scored]

            x = images[:k]
            if attack is not None:
                x = attack(functools.partial(logits, attack_graph), x, labels[scored], key,
                           *attack_args)
            return logits(score_graph, x)

        chunk = jax.vmap(one_batch, in_axes=(None, None, 0, 0, 0, None))
        if split == "groups" and self.num_devices > 1:
            whole, groups = PartitionSpec(), PartitionSpec("data")
            # check_vma=False: the adder kernels are custom calls with no varying-axes type.
            fn = jax.jit(jax.shard_map(chunk, mesh=self.mesh,
                                       in_specs=(whole, whole, groups, groups, groups, whole),
                                       out_specs=groups, check_vma=False))
        elif split == "batch" and self.num_devices > 1:
            def single(params, batch_stats, images, labels, keys, attack_args):
                return one_batch(params, batch_stats, images[0], labels[0], keys[0],
                                 attack_args)[None]

            examples = self._sharding(PartitionSpec(None, "data"))
            replicated = self._sharding(PartitionSpec())
            fn = under_mesh(jax.jit(
                single, in_shardings=(replicated, replicated, examples, examples, replicated,
                                      replicated)), self.mesh)
        else:
            fn = jax.jit(chunk)
        self._compiled[scoring, split] = fn
        return fn
