"""Attacks on a model whose predictions depend on the batch (BatchNorm with batch
statistics: the ``running-mean`` and ``running`` modes), for threat models the per-image
attacks of :mod:`.attacks` do not cover. Both are hashable callables for
:class:`awn_jax.evaluation.Evaluator`, pure functions of its ``logits_fn``, seeded by its
per-batch key.

* :class:`BatchMate` -- harm to batch mates (the threat model of Wu et al., "Uncovering
  Adversarial Risks of Test-Time Adaptation", ICML 2023, their Distribution Invading
  Attack): the adversary controls ``k`` images of a batch and perturbs them to raise the
  loss of the *other*, clean images, whose inputs it cannot touch. Run it with
  ``Evaluator.mates_logits(..., attacked=k)``.
* :class:`EOTPartners` -- the perturbation of ``k`` images of a batch crafted without
  knowing the other images: the gradient is averaged over random batch partners drawn
  from a pool (expectation over transformation, Athalye et al., "Synthesizing Robust
  Adversarial Examples", ICML 2018, with the batch mates as the transformation). Run it on
  whole batches laid out ``[k attacked images, B - k partners the defender picked]``: it
  reads only the first ``k`` images and labels, returns the partners untouched, and the
  evaluator then scores the crafted images among those unseen partners.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from awn_jax.errors import UserError
from awn_jax.robustness.attack_core import check_steps, iterate, project


def _mean_ce(logits, labels):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                             labels)
    return jnp.mean(losses)


def _random_start(key, x, eps):
    return jnp.clip(x + eps * jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class BatchMate:
    """Signed gradient ascent (PGD) on the mean cross-entropy of the clean batch mates,
    moving only the attacker's images: ``steps`` steps of ``step_size`` from a uniform
    random start in the eps-ball, each projected onto the ball around the attacker's clean
    images and onto [0, 1]. ``eps >= 1`` leaves the images free in [0, 1] (the unbounded
    attacker). Returns the iterate (start included) that misclassified the most mates,
    ties broken by the higher loss.

    Called as ``(logits_fn, images, mate_labels, key, eps, step_size)``: ``logits_fn``
    maps the attacker's images to the mates' logits (``Evaluator.mates_logits``). Under
    ``tracked`` the mates' logits do not depend on the attacker's images, the gradient is
    exactly zero and the mates are scored exactly as without attack.
    """

    steps: int

    def __call__(self, logits_fn, images, mate_labels, key, eps, step_size):
        steps = check_steps(self.steps)

        def objective(z):
            logits = logits_fn(z)
            wrong = jnp.sum(jnp.argmax(logits, -1) != mate_labels, dtype=jnp.int32)
            return _mean_ce(logits, mate_labels), wrong

        evaluate = jax.value_and_grad(objective, has_aux=True)

        def body(_, carry):
            z, best, best_wrong, best_loss = carry
            (loss, wrong), grad = evaluate(z)
            better = (wrong > best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
            best, best_wrong, best_loss = jax.tree.map(
                lambda new, old: jnp.where(better, new, old), (z, wrong, loss),
                (best, best_wrong, best_loss))
            return (project(z + step_size * jnp.sign(grad), images, eps), best, best_wrong,
                    best_loss)

        start = _random_start(key, images, eps)
        loss_dtype = jax.eval_shape(objective, start)[0].dtype
        init = (start, start, jnp.asarray(-1, jnp.int32), jnp.asarray(-jnp.inf, loss_dtype))
        z, best, best_wrong, best_loss = iterate(steps, body, init)
        loss, wrong = objective(z)      # the last iterate, whose gradient is not needed
        better = (wrong > best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
        return jnp.where(better, z, best)


@dataclasses.dataclass(frozen=True)
class EOTPartners:
    """PGD on the first ``attacked`` images of a batch whose other images the attacker does
    not know: each of ``steps`` signed steps follows the gradient of the attacked images'
    mean cross-entropy averaged over ``draws`` batches, each completed with ``B -
    attacked`` partners drawn uniformly (with replacement) from ``pool``; random start in
    the eps-ball, projection onto the ball and [0, 1] after each step, last iterate
    returned.

    Called as ``(logits_fn, batch, labels, key, eps, step_size, pool)`` with ``logits_fn``
    the model on a whole batch of ``B`` images (``Evaluator.logits`` with
    ``attacked=None``); rows ``attacked:`` of ``batch`` (the defender's partners) are
    returned as they are and never read.
    """

    attacked: int
    draws: int
    steps: int

    def __call__(self, logits_fn, batch, labels, key, eps, step_size, pool):
        k, steps = self.attacked, check_steps(self.steps)
        if not 1 <= k < batch.shape[0]:
            raise UserError(f"EOT needs 1 <= attacked < batch size, got {k} of "
                            f"{batch.shape[0]}")
        if self.draws < 1:
            raise UserError(f"EOT needs draws >= 1, got {self.draws}")
        x, y, pool = batch[:k], labels[:k], jnp.asarray(pool)
        num_partners = batch.shape[0] - k
        key_start, key_steps = jax.random.split(key)
        gradients = steps * self.draws   # both loops unrolled on the CPU, or neither

        def loss(z, partners):
            return _mean_ce(logits_fn(jnp.concatenate([z, partners]))[:k], y)

        def expected_grad(z, step_key):
            def add(d, total):
                picks = jax.random.randint(jax.random.fold_in(step_key, d), (num_partners,),
                                           0, pool.shape[0])
                return total + jax.grad(loss)(z, pool[picks])
            return iterate(self.draws, add, jnp.zeros_like(z), gradients=gradients) / self.draws

        def body(i, z):
            grad = expected_grad(z, jax.random.fold_in(key_steps, i))
            return project(z + step_size * jnp.sign(grad), x, eps)

        z = iterate(steps, body, _random_start(key_start, x, eps), gradients=gradients)
        return batch.at[:k].set(z)
