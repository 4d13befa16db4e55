"""L-inf attacks: constraints, closed-form optima on linear models, determinism, strength
ordering on a small trained model, the legacy RFGSM rule, batch-dependent models, APGD's
step-size schedule, APGD-DLR's scale invariance, Square's schedule and its never touching a
gradient, and the registry.

All attack runs go through one jitted function per (attack, steps), with the model
parameters, eps and step size as traced arguments, so the tests share compilations.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from awn_jax.robustness import attack_core, attacks, autoattack

EPS, STEP = 8 / 255, 2 / 255
SHAPE = (128, 2, 2, 3)            # every batch in this file, images NHWC
DIM = 12
HIDDEN = 32
# Steps used throughout: with step 2/255 and eps 8/255 enough for BIM/PGD/MIM
# (10 * 2/255 >= 2 eps, from anywhere in the ball) and RFGSM (5 * alpha from -alpha to
# +eps) to reach the far corner of the ball on a linear model.
STEPS = {"fgsm": 1, "bim": 10, "pgd": 10, "mim": 10, "rfgsm": 5, "rfgsm-legacy": 5,
         "apgd-ce": 20, "apgd-dlr": 20, "square": 100}
RANDOMIZED = ["pgd", "rfgsm", "rfgsm-legacy", "apgd-ce", "apgd-dlr", "square"]
DETERMINISTIC = ["fgsm", "bim", "mim"]


def num_classes(name):
    """The DLR loss needs 3 classes or more; every other attack runs on 2."""
    return 4 if name == "apgd-dlr" else 2


def apply(params, images):
    """Linear + one-hidden-layer ReLU model; normalization inside, as in the real models."""
    x = ((images - 0.5) / 0.25).reshape(images.shape[0], -1)
    hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
    return x @ params["w0"] + hidden @ params["w2"] + params["b2"]


def rng(seed):
    # Test data from NumPy: eager jax.random calls would each compile their own kernel.
    return np.random.default_rng(seed)


def init_params(seed, classes=2, linear_only=False, scale=1.0):
    r = rng(seed)
    params = {"w0": scale * r.normal(size=(DIM, classes)) / DIM ** 0.5,
              "w1": r.normal(size=(DIM, HIDDEN)) / DIM ** 0.5,
              "b1": np.zeros(HIDDEN),
              "w2": r.normal(size=(HIDDEN, classes)) / HIDDEN ** 0.5,
              "b2": np.zeros(classes)}
    if linear_only:
        params["w1"] = np.zeros_like(params["w1"])
        params["w2"] = np.zeros_like(params["w2"])
    return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


@functools.lru_cache(maxsize=None)
def compiled(name, steps):
    def run(params, images, labels, key, eps, step_size):
        return attacks.attack(name, functools.partial(apply, params), images, labels,
                              key=key, eps=eps, step_size=step_size, steps=steps)
    return jax.jit(run)


def run_attack(name, params, images, labels, key=0, eps=EPS, step_size=STEP, steps=None):
    steps = STEPS[name] if steps is None else steps
    return compiled(name, steps)(params, images, labels, jax.random.key(key), eps, step_size)


def accuracy(params, images, labels):
    return float(jnp.mean(jnp.argmax(apply(params, images), -1) == labels))


def margins(logits, labels):
    true = jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
    other = jnp.max(jnp.where(jax.nn.one_hot(labels, logits.shape[-1]) > 0, -jnp.inf,
                              logits), -1)
    return true - other


def boundary_images(seed):
    """A third of the pixels in [0, 0.01], a third in [0.99, 1], a third mid-range."""
    r = rng(seed)
    u = r.uniform(size=SHAPE)
    region = r.integers(0, 3, SHAPE)
    images = np.select([region == 0, region == 1], [0.01 * u, 1 - 0.01 * u], 0.2 + 0.6 * u)
    return jnp.asarray(images, jnp.float32)


def mid_images(seed):
    return jnp.asarray(rng(seed).uniform(0.3, 0.7, SHAPE), jnp.float32)


def random_labels(seed, classes=2):
    return jnp.asarray(rng(seed).integers(0, classes, SHAPE[:1]), jnp.int32)


# ------------------------------------------------------------------ constraints

@pytest.mark.parametrize("name", [n for n in attacks.ATTACKS if n != "rfgsm-legacy"])
@pytest.mark.parametrize("eps", [EPS, 0.1])
def test_output_in_eps_ball_and_unit_box(name, eps):
    params = init_params(0, classes=num_classes(name), scale=3.0)
    x = boundary_images(1)
    y = random_labels(2, num_classes(name))
    adv = run_attack(name, params, x, y, eps=eps, step_size=eps / 4)
    chex.assert_shape(adv, x.shape)
    chex.assert_type(adv, x.dtype)
    assert float(jnp.max(jnp.abs(adv - x))) <= eps + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    # Clipping mattered (pixels at the box edge) and the attack moved the images.
    assert bool(jnp.any((adv == 0.0) & (x > 0))) or bool(jnp.any((adv == 1.0) & (x < 1)))
    assert float(jnp.max(jnp.abs(adv - x))) > 0.9 * eps


def test_rfgsm_legacy_stays_in_unit_box():
    params = init_params(0, scale=3.0)
    x = boundary_images(1)
    adv = run_attack("rfgsm-legacy", params, x, random_labels(2))
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


# ------------------------------------------------------------------ closed-form optimum

@pytest.mark.parametrize("name", ["fgsm", "bim", "pgd", "mim", "rfgsm", "apgd-ce"])
def test_linear_two_class_model_reaches_closed_form_optimum(name):
    """For logits = x W (2 classes) the L-inf problem max_{|d| <= eps} CE has the solution
    d = eps * sign(w_other - w_true) (away from the [0, 1] boundary)."""
    params = init_params(3, linear_only=True, scale=0.5)
    x = mid_images(4)
    y = random_labels(5)
    w = params["w0"]                                       # (DIM, 2)
    direction = (w[:, 1] - w[:, 0])[None, :] * jnp.where(y == 0, 1.0, -1.0)[:, None]
    optimum = x + EPS * jnp.sign(direction).reshape(x.shape)
    adv = run_attack(name, params, x, y)
    np.testing.assert_allclose(adv, optimum, atol=1e-6)
    # The optimal value: the margin drops by eps * ||w_true - w_other||_1 / 0.25 (the
    # model's input normalization), for every example.
    drop = margins(apply(params, x), y) - margins(apply(params, adv), y)
    np.testing.assert_allclose(drop, EPS * jnp.sum(jnp.abs(w[:, 1] - w[:, 0])) / 0.25,
                               rtol=1e-4)


# ------------------------------------------------------------------ randomness

@pytest.mark.parametrize("name", list(attacks.ATTACKS))
def test_same_key_same_images(name):
    params = init_params(6, classes=num_classes(name))
    x, y = mid_images(7), random_labels(8, num_classes(name))
    chex.assert_trees_all_equal(run_attack(name, params, x, y, key=11),
                                run_attack(name, params, x, y, key=11))


@pytest.mark.parametrize("name", RANDOMIZED)
def test_different_keys_differ_for_randomized_attacks(name):
    params = init_params(6, classes=num_classes(name))
    x, y = mid_images(7), random_labels(8, num_classes(name))
    a = run_attack(name, params, x, y, key=11)
    b = run_attack(name, params, x, y, key=12)
    assert float(jnp.mean(a != b)) > 0.05


@pytest.mark.parametrize("name", ["bim", "pgd", "mim", "rfgsm", "apgd-ce", "apgd-dlr"])
def test_unrolled_iterations_equal_the_loop_in_float64(name, monkeypatch):
    """The CPU unrolls the short attacks (attack_core.iterate): the same iterates as the loop."""
    def adversarial(unroll_max_steps):
        monkeypatch.setattr(attack_core, "UNROLL_MAX_STEPS", unroll_max_steps)
        params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64),
                              init_params(6, classes=num_classes(name)))
        run = jax.jit(lambda p, x, y, key: attacks.attack(
            name, functools.partial(apply, p), x, y, key=key, steps=STEPS[name]))
        args = (params, jnp.asarray(mid_images(7), jnp.float64),
                random_labels(8, num_classes(name)), jax.random.key(3))
        return run(*args), run.lower(*args).as_text().count("stablehlo.while")

    default = attack_core.UNROLL_MAX_STEPS
    assert STEPS[name] <= default
    with jax.enable_x64():
        (rolled, loops), (unrolled, fewer) = adversarial(0), adversarial(default)
    assert loops == fewer + 1   # the attack's loop is gone (random draws may hold others)
    assert float(jnp.max(jnp.abs(rolled - mid_images(7)))) > 0   # the attack moved
    np.testing.assert_allclose(unrolled, rolled, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_attacks_ignore_key(name):
    params = init_params(6)
    x, y = mid_images(7), random_labels(8)
    chex.assert_trees_all_equal(run_attack(name, params, x, y, key=11),
                                run_attack(name, params, x, y, key=12))
    # and work without one
    fn = functools.partial(apply, params)
    without_key = jax.jit(lambda x, y: attacks.ATTACKS[name](fn, x, y, steps=STEPS[name]))
    chex.assert_trees_all_close(without_key(x, y), run_attack(name, params, x, y),
                                atol=1e-6)


@pytest.mark.parametrize("name", RANDOMIZED)
def test_randomized_attacks_require_a_key(name):
    params = init_params(6, classes=num_classes(name))
    x, y = mid_images(7), random_labels(8, num_classes(name))
    with pytest.raises(ValueError, match="key"):
        attacks.ATTACKS[name](functools.partial(apply, params), x, y, steps=1)


# ------------------------------------------------------------------ strength on a trained model

@pytest.fixture(scope="module")
def xor_problem():
    """A two-class XOR problem in a random 2-D subspace of the 12-pixel images, with a
    gap around the axes, and a small ReLU network trained on it with optax."""
    r = rng(0)
    u = r.uniform(-1.0, 1.0, (SHAPE[0], 2))
    u = u + 0.15 * np.sign(u)
    labels = jnp.asarray((u[:, 0] > 0) ^ (u[:, 1] > 0), jnp.int32)
    basis = np.linalg.qr(r.normal(size=(DIM, 2)))[0].T
    images = 0.5 + 0.15 * u @ basis + 0.01 * r.normal(size=(SHAPE[0], DIM))
    images = jnp.asarray(images.reshape(SHAPE), jnp.float32)
    optimizer = optax.adam(3e-2)

    @jax.jit
    def train(params):
        def loss(p):
            logits = apply(p, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        def step(carry, _):
            p, state = carry
            grads = jax.grad(loss)(p)
            updates, state = optimizer.update(grads, state)
            return (optax.apply_updates(p, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None,
                                      length=400)
        return params

    params = train(init_params(1))
    return params, images, labels


def test_iterative_attacks_beat_fgsm_on_trained_model(xor_problem):
    params, x, y = xor_problem
    eps = 0.05
    clean = accuracy(params, x, y)
    acc = {name: accuracy(params, run_attack(name, params, x, y, eps=eps,
                                             step_size=eps / 4), y)
           for name in ["fgsm", "bim", "pgd", "mim", "apgd-ce"]}
    assert clean >= 0.99, clean
    assert acc["fgsm"] <= clean - 0.3, acc          # FGSM works,
    for name in ["bim", "pgd", "mim", "apgd-ce"]:   # but the iterative attacks do better.
        assert acc[name] <= acc["fgsm"] - 0.05, acc


def test_apgd_never_returns_a_higher_margin_than_clean(xor_problem):
    params, x, y = xor_problem
    adv = run_attack("apgd-ce", params, x, y, eps=0.02)
    assert bool(jnp.all(margins(apply(params, adv), y) <= margins(apply(params, x), y)))
    assert accuracy(params, adv, y) < accuracy(params, x, y)


# ------------------------------------------------------------------ RFGSM variants

def test_rfgsm_legacy_leaves_the_ball_and_rfgsm_does_not():
    """On a linear model the gradient sign s is constant: legacy RFGSM (torchattacks 2.x)
    moves alpha * r + steps * (eps - alpha) * s per pixel, 28/255 or 32/255 for 5 steps;
    projected RFGSM (3.x) ends at eps * s."""
    params = init_params(3, linear_only=True, scale=0.5)
    x, y = mid_images(4), random_labels(5)
    w = params["w0"]
    s = jnp.sign((w[:, 1] - w[:, 0])[None, :] * jnp.where(y == 0, 1.0, -1.0)[:, None])
    s = s.reshape(x.shape)

    legacy = run_attack("rfgsm-legacy", params, x, y, steps=5)
    delta = (legacy - x) * s * 255
    assert float(jnp.max(jnp.abs(legacy - x))) > EPS + 1e-3
    assert bool(jnp.all((jnp.abs(delta - 28) < 1e-3) | (jnp.abs(delta - 32) < 1e-3)))

    projected = run_attack("rfgsm", params, x, y, steps=5)
    np.testing.assert_allclose(projected, x + EPS * s, atol=1e-6)

    # With one step, legacy RFGSM is Tramer et al.'s R+FGSM: alpha r + (eps - alpha) s,
    # inside the ball.
    single = run_attack("rfgsm-legacy", params, x, y, steps=1)
    delta = (single - x) * s * 255
    assert bool(jnp.all((jnp.abs(delta - 4) < 1e-3) | (jnp.abs(delta - 8) < 1e-3)))


def test_rfgsm_rejects_alpha_above_eps():
    params = init_params(3)
    x, y = mid_images(4), random_labels(5)
    for fn in (attacks.rfgsm, attacks.rfgsm_legacy):
        with pytest.raises(ValueError, match="eps"):
            fn(functools.partial(apply, params), x, y, key=jax.random.key(0), eps=0.01,
               step_size=0.02)


# ------------------------------------------------------------------ batch-dependent models

def batchnorm_logits(params, images):
    """Features normalized with the current batch's statistics (BN 'running' mode)."""
    features = ((images - 0.5) / 0.25).reshape(images.shape[0], -1) @ params["v"]
    mean = jnp.mean(features, 0)
    var = jnp.var(features, 0)
    return jnp.tanh((features - mean) / jnp.sqrt(var + 1e-5)) @ params["w"]


@pytest.fixture(scope="module")
def batchnorm_model():
    r = rng(9)
    params = {"v": jnp.asarray(r.normal(size=(DIM, 8)), jnp.float32),
              "w": jnp.asarray(r.normal(size=(8, 5)), jnp.float32)}
    x = mid_images(10)
    y = random_labels(11, classes=5)
    return params, x, y


def test_gradient_is_of_the_batch_loss_through_batch_statistics(batchnorm_model):
    params, x, y = batchnorm_model
    fn = functools.partial(batchnorm_logits, params)
    adv = jax.jit(lambda x, y: attacks.fgsm(fn, x, y, eps=EPS))(x, y)

    def batch_loss(z):
        return optax.softmax_cross_entropy_with_integer_labels(fn(z), y).mean()

    expected = jnp.clip(x + EPS * jnp.sign(jax.jit(jax.grad(batch_loss))(x)), 0, 1)
    np.testing.assert_allclose(adv, expected, atol=1e-6)

    # The cross-terms through the batch statistics matter: freezing the statistics (as a
    # per-example attack would) gives a different sign somewhere.
    def frozen_stats_loss(z):
        features = ((z - 0.5) / 0.25).reshape(z.shape[0], -1) @ params["v"]
        mean = jax.lax.stop_gradient(jnp.mean(features, 0))
        std = jax.lax.stop_gradient(jnp.sqrt(jnp.var(features, 0) + 1e-5))
        logits = jnp.tanh((features - mean) / std) @ params["w"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    frozen = jnp.clip(x + EPS * jnp.sign(jax.jit(jax.grad(frozen_stats_loss))(x)), 0, 1)
    assert float(jnp.max(jnp.abs(adv - frozen))) > EPS


@pytest.mark.parametrize("name", ["bim", "apgd-ce"])
def test_attack_on_one_example_depends_on_the_rest_of_the_batch(batchnorm_model, name):
    params, x, y = batchnorm_model
    fn = functools.partial(batchnorm_logits, params)
    run = jax.jit(lambda x, y: attacks.attack(name, fn, x, y, key=jax.random.key(0),
                                              steps=10))
    other = x.at[1:].set(jnp.clip(1.0 - x[1:] + 0.1, 0, 1))   # same first example
    a, b = run(x, y), run(other, y)
    assert bool(jnp.all(jnp.isfinite(a)))
    assert float(jnp.max(jnp.abs(a - x))) <= EPS + 1e-6
    assert float(jnp.max(jnp.abs(a[0] - b[0]))) > 0.5 * EPS


# ------------------------------------------------------------------ APGD schedule

def test_apgd_checkpoints_follow_the_paper():
    # w_j = ceil(p_j N): p = 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 for N = 100.
    assert [done for done, _ in autoattack.apgd_checkpoints(100)] == [
        22, 41, 57, 70, 80, 87, 93, 99]
    assert [k for _, k in autoattack.apgd_checkpoints(100)] == [22, 19, 16, 13, 10, 7, 6, 6]
    assert autoattack.apgd_checkpoints(1) == [(1, 1)]


def test_apgd_halves_the_step_size_when_the_loss_stops_increasing():
    """On a linear model APGD reaches the corner optimum in its first step (eta = 2 eps)
    and the loss cannot increase after that: condition 1 holds at all 8 checkpoints of 100
    iterations, so every example ends with eta = 2 eps / 2^8, at the optimum."""
    params = init_params(3, linear_only=True, scale=0.5)
    x, y = mid_images(4), random_labels(5)
    fn = functools.partial(apply, params)
    run = jax.jit(lambda x, y: autoattack._apgd_run(fn, x, y, key=jax.random.key(1),
                                                  eps=EPS, steps=100))
    adv, step, loss_best = run(x, y)
    np.testing.assert_allclose(step, 2 * EPS / 2 ** 8, rtol=1e-6)
    w = params["w0"]
    s = jnp.sign((w[:, 1] - w[:, 0])[None, :] * jnp.where(y == 0, 1.0, -1.0)[:, None])
    np.testing.assert_allclose(adv, x + EPS * s.reshape(x.shape), atol=1e-6)
    np.testing.assert_allclose(
        loss_best, optax.softmax_cross_entropy_with_integer_labels(fn(adv), y), rtol=1e-5)


# ------------------------------------------------------------------ APGD-DLR

def closed_form_misclassified(w, b, x, y, eps):
    """For logits ``((x - 0.5) / 0.25) W + b`` and x at least eps inside [0, 1]: example i
    can be misclassified iff some class j has ``m_j - eps ||w_y - w_j||_1 / 0.25 < 0``
    (m_j: clean logit of y minus that of j), the minimum of the margin to j over the ball."""
    logits = ((x - 0.5) / 0.25).reshape(x.shape[0], -1) @ w + b
    gaps = jnp.take_along_axis(logits, y[:, None], -1) - logits
    l1 = jnp.sum(jnp.abs(w[:, y].T[:, None, :] - w.T[None]), -1) / 0.25
    best = jnp.where(jax.nn.one_hot(y, w.shape[1]) > 0, jnp.inf, gaps - eps * l1)
    return np.asarray(jnp.min(best, -1) < 0)


def linear_problem(seed, classes, far_bias=None):
    """A linear model, mid-range images and their clean predictions as labels (so every
    example starts correct). ``far_bias``: biases that put classes 2.. far below 0 and 1."""
    r = rng(seed)
    w = jnp.asarray(0.5 * r.normal(size=(DIM, classes)) / DIM ** 0.5, jnp.float32)
    b = np.zeros(classes) if far_bias is None else np.r_[0.0, 0.0, far_bias]
    b = jnp.asarray(b, jnp.float32)
    x = mid_images(seed + 10)
    y = jnp.argmax(((x - 0.5) / 0.25).reshape(x.shape[0], -1) @ w + b, -1)
    return w, b, x, y


def linear_attack(name, w, b, x, y, eps, scale=1.0):
    def logits_fn(z):
        return scale * (((z - 0.5) / 0.25).reshape(z.shape[0], -1) @ w + b)
    adv = jax.jit(lambda x, y: attacks.attack(name, logits_fn, x, y, key=jax.random.key(0),
                                              eps=eps, steps=100))(x, y)
    return np.asarray(jnp.argmax(logits_fn(adv), -1) != y)


@pytest.mark.parametrize("eps", [2 / 255, 4 / 255, 8 / 255])
def test_apgd_dlr_finds_the_closed_form_misclassifications_on_a_linear_model(eps):
    """Two classes compete, two more lie far below (they set DLR's denominator). APGD-DLR
    misclassifies exactly the examples whose closed-form optimum is misclassified, also
    when the logits are multiplied by 1e4, where the cross-entropy's gradient underflows
    to zero and APGD-CE stays at its random start."""
    w, b, x, y = linear_problem(2, 4, far_bias=[-5.0, -6.0])
    expected = closed_form_misclassified(w, b, x, y, eps)
    assert 0 < expected.sum() < len(expected)
    np.testing.assert_array_equal(linear_attack("apgd-dlr", w, b, x, y, eps), expected)
    np.testing.assert_array_equal(linear_attack("apgd-dlr", w, b, x, y, eps, scale=1e4),
                                  expected)
    assert linear_attack("apgd-ce", w, b, x, y, eps, scale=1e4).sum() < expected.sum() / 2


def test_apgd_dlr_misclassifies_only_what_the_ball_allows():
    """Five competing classes: every example APGD-DLR misclassifies can be misclassified
    within the ball, and it finds most of them (an untargeted DLR step can pursue another
    class than the one that would succeed, so not always all)."""
    w, b, x, y = linear_problem(2, 5)
    expected = closed_form_misclassified(w, b, x, y, 4 / 255)
    found = linear_attack("apgd-dlr", w, b, x, y, 4 / 255)
    assert not np.any(found & ~expected)
    assert found.sum() >= 0.9 * expected.sum() > 20


def test_dlr_loss_is_invariant_to_shifting_and_scaling_the_logits():
    logits = jnp.asarray(rng(0).normal(size=(16, 10)), jnp.float32)
    labels = jnp.asarray(rng(1).integers(0, 10, 16), jnp.int32)
    loss = attack_core.dlr(logits, labels)
    np.testing.assert_allclose(attack_core.dlr(7.0 * logits - 3.0, labels), loss, rtol=1e-5)
    top = jnp.sort(logits, -1)[:, ::-1]
    true = logits[jnp.arange(16), labels]
    other = jnp.where(true == top[:, 0], top[:, 1], top[:, 0])
    np.testing.assert_allclose(loss, -(true - other) / (top[:, 0] - top[:, 2]), rtol=1e-6)
    with pytest.raises(ValueError, match="at least 3 classes"):
        attack_core.dlr(logits[:, :2], labels % 2)


# ------------------------------------------------------------------ Square

@pytest.mark.parametrize("size, side", [(32, 5), (32, 31), (8, 8), (8, 1)])
def test_square_corners_follow_the_reference_rule(size, side):
    """As max-andr/square-attack, AutoAttack and torchattacks draw them: uniform over
    0..size-side-1 (never the last fitting position size-side), 0 when side = size."""
    corners = np.asarray(autoattack.square_corners(jax.random.key(0), 20_000, size, side))
    expected = np.arange(max(size - side, 1))
    assert set(np.unique(corners)) == set(expected)
    counts = np.bincount(corners.ravel(), minlength=len(expected))
    assert counts.min() > 0.8 * counts.mean()  # uniform up to sampling noise


def test_square_schedule_halves_the_window_area():
    # 10,000 queries: p = 0.8 until iteration 10, then halved at 50, 200, ...: on a 32x32
    # image sides round(sqrt(0.8 * 1024)) = 29, then 20, 14, 10, 7, 5, 4, 3, 2, 1.
    sides = autoattack.square_sides(10001, 32, 32)
    assert len(sides) == 10000
    assert [sides[i] for i in (0, 10, 11, 51, 201, 501, 1001, 2001, 4001, 6001, 8001)] == [
        29, 29, 20, 14, 10, 7, 5, 4, 3, 2, 1]
    # Rescaled to a smaller budget: the same sequence of sides, compressed.
    small = autoattack.square_sides(1001, 32, 32)
    assert small[0] == 29 and small[-1] == 1 and small == sorted(small, reverse=True)
    assert autoattack.square_sides(1, 32, 32) == []


def without_gradient(fn):
    """``fn`` whose derivative raises: any jvp, vjp or grad of it fails."""
    @jax.custom_jvp
    def guarded(x):
        return fn(x)

    @guarded.defjvp
    def _(primals, tangents):
        raise AssertionError("the model was differentiated")

    return guarded


def test_square_lowers_accuracy_without_differentiating_the_model(xor_problem):
    params, x, y = xor_problem
    logits_fn = without_gradient(functools.partial(apply, params))
    with pytest.raises(AssertionError, match="differentiated"):    # the guard works
        jax.grad(lambda z: logits_fn(z).sum())(x)
    adv = jax.jit(lambda x, y: autoattack.square(logits_fn, x, y, key=jax.random.key(0),
                                              eps=0.05, steps=300))(x, y)
    assert float(jnp.max(jnp.abs(adv - x))) <= 0.05 + 1e-6
    clean = accuracy(params, x, y)
    assert accuracy(params, adv, y) <= clean - 0.5, (clean, accuracy(params, adv, y))


def test_square_only_keeps_changes_that_lower_the_margin(xor_problem):
    """On a per-example model 20 more queries never raise an example's margin above that
    of the striped start (one query: the same key draws the same start), and lower many."""
    params, x, y = xor_problem
    fn = functools.partial(apply, params)

    def run(queries):
        return jax.jit(lambda x, y: autoattack.square(fn, x, y, key=jax.random.key(3),
                                                   eps=0.03, steps=queries))(x, y)

    start, adv = run(1), run(21)
    assert bool(jnp.all(margins(fn(adv), y) <= margins(fn(start), y) + 1e-6))
    assert float(jnp.mean(margins(fn(adv), y) < margins(fn(start), y) - 1e-6)) > 0.3


# ------------------------------------------------------------------ registry

def test_registry_names_and_defaults():
    assert set(attacks.ATTACKS) == {"fgsm", "bim", "pgd", "mim", "rfgsm", "rfgsm-legacy",
                                    "apgd-ce", "apgd-dlr", "square"}
    expected_steps = {"fgsm": 1, "bim": 7, "pgd": 7, "mim": 5, "rfgsm": 5,
                      "rfgsm-legacy": 5, "apgd-ce": 100, "apgd-dlr": 100, "square": 5000}
    for name, steps in expected_steps.items():
        settings = attacks.default_settings(name)
        assert settings["eps"] == pytest.approx(8 / 255)
        assert settings["steps"] == steps
        if name in ("fgsm", "apgd-ce", "apgd-dlr", "square"):
            assert settings["step_size"] is None
        else:
            assert settings["step_size"] == pytest.approx(2 / 255)


def test_unknown_attack_names_list_the_known_ones():
    for call in (lambda: attacks.default_settings("cw"),
                 lambda: attacks.check_attack_name("cw"),
                 lambda: attacks.attack("cw", None, None, None, key=None)):
        with pytest.raises(ValueError, match="pgd.*rfgsm-legacy.*apgd-ce"):
            call()
    assert attacks.check_attack_name("pgd") == "pgd"


def test_attack_applies_defaults_and_overrides(monkeypatch):
    seen = {}

    def recorder(logits_fn, images, labels, *, key, eps, step_size, steps):
        seen.update(eps=eps, step_size=step_size, steps=steps, key=key)
        return images

    monkeypatch.setitem(attacks.ATTACKS, "mim", recorder)
    attacks.attack("mim", None, jnp.zeros(SHAPE), jnp.zeros(SHAPE[0], jnp.int32), key=3)
    assert seen == {"eps": 8 / 255, "step_size": 2 / 255, "steps": 5, "key": 3}
    attacks.attack("mim", None, jnp.zeros(SHAPE), jnp.zeros(SHAPE[0], jnp.int32), key=3,
                   eps=0.1, steps=9)
    assert seen == {"eps": 0.1, "step_size": 2 / 255, "steps": 9, "key": 3}


def test_steps_must_be_a_static_int():
    params = init_params(3)
    x, y = mid_images(4), random_labels(5)
    fn = functools.partial(apply, params)
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda x, y, n: attacks.bim(fn, x, y, steps=n))(x, y, 3)
    with pytest.raises(TypeError, match="static"):
        attacks.bim(fn, x, y, steps=2.5)
    with pytest.raises(ValueError, match=">= 0"):
        attacks.bim(fn, x, y, steps=-1)
