"""A strict evaluation of the batch-statistics BatchNorm modes (``running-mean``, the
paper's "-R"; ``running``, "-r"), with ``tracked`` as the per-example control on every row.

Test-time defenses that make a prediction depend on other inputs have repeatedly looked
robust to fixed white-box attacks and then fallen to attacks designed for them (Croce et
al., ICML 2022; Carlini et al. 2019). So, per run and BN mode, on the same first ``N``
test images in batches of ``B``:

* **checklist** (accuracy on the attacked images; each a different attack or threat
  model, see ``CHECKS``): clean, PGD-7 (the paper's), APGD-CE, APGD-DLR, Square
  (gradient-free), transfer from ``tracked``, EOT over unknown batch partners, and the
  worst case: an example counts as robust only if it is correct clean and after every
  attack row (as AutoAttack reports), so it is never above any single row.
* **harm to batch mates** (:class:`.batch_attacks.BatchMate`): accuracy of the ``B - k``
  clean images of each batch when the adversary perturbs the other ``k``, against ``k``.
  Under ``tracked`` it must equal the clean accuracy exactly.
* **controls**: clean and PGD-7 at batch size 1 (the batch modes' degenerate case),
  in single-class batches (the batch mean is then a class mean), and on the same examples
  in mixed batches of that size.

With a ``cache_dir``, every part (one checklist row, one harm point, one control, of one
mode) is saved when done and reused by a restarted study with the same settings, so a
killed study (hours on a CPU) loses only the part in progress.

Standard errors are binomial, ``sqrt(p (1 - p) / n)``; for the harm curve the mates of
one batch share their attacker, so the true error there is larger.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import tqdm

from awn_jax import reports
from awn_jax.errors import UserError
from awn_jax.nn.batchnorm import check_bn_modes
from awn_jax.robustness import attacks, autoattack
from awn_jax.robustness.batch_attacks import BatchMate, EOTPartners
from awn_jax.robustness.studies import single_class_order

# Checklist rows: name -> threat model (what the attacker controls and knows).
CHECKS = {
    "clean": "no attacker",
    "pgd": "white box, whole batch (the paper's)",
    "apgd-ce": "white box, whole batch",
    "apgd-dlr": "white box, whole batch",
    "square": "scores only (no gradient), whole batch",
    "transfer": "crafted on tracked (per example), scored in the batch",
    "eot": "k per batch, batch mates unknown (EOT over random partners)",
    "worst": "per example: correct clean and after every row above",
}
HARM_FRACTIONS = (0.05, 0.10, 0.25)   # besides k = 1
# Each evaluation's random key (attacks.named_key); frozen: the numbers of cached parts
# depend on it (they were the checks' positions when keys were positional).
KEY_IDS = {"clean": 0, "pgd": 1, "apgd-ce": 2, "apgd-dlr": 3, "square": 4, "transfer": 5,
           "eot": 6, "worst": 7, "mates": 8}


def _budget(default, help_text):
    """A field with its help (``evaluate.py --study strict --help``) and lower bound 1."""
    return dataclasses.field(default=default, metadata={"help": help_text, "lower_bound": 1})


@dataclasses.dataclass(frozen=True)
class Budgets:
    """Attack strengths. Defaults: AutoAttack's (APGD 100 iterations, Square 5,000
    queries); EOT ``eot_attacked`` None: 10% of the batch; ``mate_sizes`` (the attacker's
    images per batch of the harm curve) None: ``harm_sizes(batch_size)``."""

    apgd_steps: int = _budget(100, "APGD-CE/-DLR iterations.")
    square_queries: int = _budget(5000, "Square's query budget per image.")
    transfer_attack: str = _budget("pgd", "Attack crafted under tracked, scored in the batch.")
    eot_attacked: int | None = _budget(None, "Images per batch crafted by EOT over random "
                                       "partners (none given: 10%).")
    eot_draws: int = _budget(4, "Partner batches per EOT step.")
    eot_steps: int = _budget(10, "EOT's PGD steps.")
    mate_steps: int = _budget(20, "Steps of the batch-mate attack (step eps/4).")
    mate_unbounded: bool = _budget(False, "The batch-mate attacker's images are free in "
                                   "[0, 1], not in the ball.")
    mate_sizes: tuple[int, ...] | None = _budget(
        None, "The harm curve's k, images the attacker controls per batch (none given: 1, "
        "5%, 10% and 25% of the batch).")
    control_batch_size: int = _budget(50, "Size of the single-class (and matching mixed) "
                                      "control batches.")

    def resolved(self, batch_size: int) -> Budgets:
        """These budgets with the defaults that depend on the batch filled in (EOT's ``k``,
        the harm curve's sizes) and checked against it: the one place they are decided."""
        resolved = dataclasses.replace(
            self, eot_attacked=self.eot_attacked or max(1, batch_size // 10),
            mate_sizes=tuple(self.mate_sizes or harm_sizes(batch_size)))
        attacks.check_attack_name(self.transfer_attack)
        for what, k in [("EOT's", resolved.eot_attacked)] + [
                ("the batch-mate", k) for k in self.mate_sizes or ()]:
            if not 1 <= k < batch_size:
                raise UserError(f"{what} attacked images per batch must be in "
                                f"[1, {batch_size - 1}] for batches of {batch_size}, got {k}")
        return resolved


def harm_sizes(batch_size: int) -> tuple[int, ...]:
    """k = 1 and 5%, 10%, 25% of the batch (rounded up), without repeats."""
    sizes = [1] + [math.ceil(f * batch_size) for f in HARM_FRACTIONS]
    return tuple(k for k in dict.fromkeys(sizes) if k < batch_size)


def binomial(correct) -> dict:
    """Accuracy of a boolean array with its binomial standard error."""
    correct = np.asarray(correct, bool).reshape(-1)
    n = correct.size
    p = float(correct.mean())
    return {"accuracy": p, "correct": int(correct.sum()), "n": n,
            "se": math.sqrt(p * (1 - p) / n)}


def worst_case(per_example: dict) -> np.ndarray:
    """Per example: correct in every entry of ``per_example`` (name -> boolean array)."""
    return np.logical_and.reduce([np.asarray(v, bool) for v in per_example.values()])


class _Study:
    """The evaluations of one run, all through ``run.evaluator``; each part saved under
    ``cache_dir`` (if given) with the study's ``settings``; ``budgets`` resolved."""

    def __init__(self, run, images, labels, *, batch_size, eps, step_size, seed, budgets,
                 settings, cache_dir, progress):
        self.run, self.images, self.labels = run, images, labels
        self.batch_size, self.eps, self.step_size, self.seed = batch_size, eps, step_size, seed
        self.budgets, self.settings, self.cache_dir = budgets, settings, cache_dir
        self.progress = progress

    def part(self, mode, name, compute):
        """``compute()`` (a JSON value), or its saved result."""
        self.progress.set_postfix_str(f"{mode}: {name}")
        if self.cache_dir is None:
            result = compute()
        else:
            stem = reports.portable_stem(f"{self.run.label}-{mode}-{name}")
            # Only Square's parts depend on how Square draws its windows (parts cached before
            # the rule was recorded stay valid for every other check).
            square = {"square_corners": autoattack.SQUARE_CORNERS} if name == "square" else {}
            result = reports.cached(self.cache_dir, stem, {"settings": self.settings, **square},
                                    compute)
        self.progress.update()
        return result

    def per_example(self, mode, name, compute) -> np.ndarray:
        """``part`` of a per-example boolean array."""
        return np.asarray(self.part(mode, name, lambda: compute().tolist()), bool)

    def key(self, name):
        return attacks.named_key(self.seed, name, KEY_IDS)

    def correct(self, bn_mode, images=None, labels=None, batch_size=None, attack=None,
                key_name="clean", **kwargs):
        """Per-example correctness (flat) of the named attack or of an Attack tuple."""
        images = self.images if images is None else images
        labels = self.labels if labels is None else labels
        batch_size = batch_size or self.batch_size
        attack, args = (None, ()) if attack is None else attack
        predictions = self.run.evaluator.predictions(
            images, labels, batch_size=batch_size, bn_mode=bn_mode, attack=attack,
            attack_args=args, key=self.key(key_name), **kwargs)
        scored = self.run.evaluator.scored_labels(labels, batch_size=batch_size, **kwargs)
        return (predictions == scored).reshape(-1)

    def attack(self, name):
        """``attacks.configured`` at the study's eps and step, with the budgets' steps
        for APGD and Square (the paper's for the others)."""
        takes_step = attacks.default_settings(name)["step_size"] is not None
        steps = {"apgd-ce": self.budgets.apgd_steps, "apgd-dlr": self.budgets.apgd_steps,
                 "square": self.budgets.square_queries}.get(name)
        return attacks.configured(name, eps=self.eps, steps=steps,
                                  step_size=self.step_size if takes_step else None)

    def checklist(self, mode) -> dict:
        transfer = self.budgets.transfer_attack
        computations = {
            "clean": lambda: self.correct(mode),
            **{name: functools.partial(self.correct, mode, attack=self.attack(name),
                                       key_name=name)
               for name in ("pgd", "apgd-ce", "apgd-dlr", "square")},
            # The transferred attack's own key: under tracked it is that row exactly.
            "transfer": lambda: self.correct(
                mode, attack=self.attack(transfer), attack_bn_mode="tracked",
                key_name=transfer if transfer in CHECKS else "transfer"),
            "eot": lambda: self.eot(mode),
        }
        per_example = {name: self.per_example(mode, name, compute)
                       for name, compute in computations.items()}
        per_example["worst"] = worst_case(per_example)
        return {name: binomial(v) for name, v in per_example.items()}

    def eot(self, mode) -> np.ndarray:
        """Each group of ``k`` examples crafted by EOT over partners drawn from the
        evaluated images, then scored among ``B - k`` fresh random partners."""
        k, b, n = self.budgets.eot_attacked, self.batch_size, len(self.labels)
        order = np.random.default_rng([self.seed, 13]).integers(0, n, (n // k, b - k))
        rows = np.concatenate([np.concatenate([np.arange(i * k, (i + 1) * k), partners])
                               for i, partners in enumerate(order)])
        attack = EOTPartners(k, self.budgets.eot_draws, self.budgets.eot_steps)
        args = (self.eps, self.step_size, self.images)
        logits = self.run.evaluator.logits(
            self.images[rows], self.labels[rows], batch_size=b, bn_mode=mode, attack=attack,
            attack_args=args, key=self.key("eot"))
        return np.argmax(logits[:, :k], -1).reshape(-1) == self.labels

    def harm(self, mode) -> list[dict]:
        b = self.budgets
        eps = 1.0 if b.mate_unbounded else self.eps
        attack = (BatchMate(b.mate_steps), (eps, eps / 4))

        def point(k):
            common = dict(attacked=k, mates=True)
            clean = self.correct(mode, **common)
            attacked = self.correct(mode, attack=attack, key_name="mates", **common)
            return {"k": k, "fraction": k / self.batch_size, "clean": binomial(clean),
                    "attacked": binomial(attacked), "flipped": int(np.sum(clean != attacked))}

        return [self.part(mode, f"harm-k{k}", functools.partial(point, k))
                for k in b.mate_sizes]

    def controls(self, mode) -> dict:
        size = self.budgets.control_batch_size
        single = single_class_order(self.labels, size)
        mixed = np.random.default_rng([self.seed, 17]).permutation(single)

        def control(rows, batch_size):
            common = dict(images=self.images[rows], labels=self.labels[rows],
                          batch_size=batch_size)
            return {"clean": binomial(self.correct(mode, **common)),
                    "pgd": binomial(self.correct(mode, attack=self.attack("pgd"),
                                                 key_name="pgd", **common))}

        return {name: self.part(mode, f"control-{name}",
                                functools.partial(control, rows, batch_size))
                for name, rows, batch_size in (
                    ("batch size 1", np.arange(len(self.labels)), 1),
                    (f"single-class batches of {size}", single, size),
                    (f"mixed batches of {size}", mixed, size))}


def strict_study(run, bn_modes, *, num_examples=None, batch_size=500, eps=attacks.DEFAULT_EPS,
                 step_size=attacks.DEFAULT_STEP_SIZE, seed=0, budgets=Budgets(),
                 show_progress=True, cache_dir: str | None = None) -> dict:
    """Checklist, harm curve and controls of ``run`` under each BN mode, on the first
    ``num_examples`` test images (cut to a multiple of the batch and of EOT's ``k``);
    each finished part saved under ``cache_dir`` (if given) and reused by a later call
    with the same weights (``run.weights_sha256``) and settings."""
    check_bn_modes(bn_modes)
    budgets = budgets.resolved(batch_size)
    images, labels = run.test_set(num_examples,
                                  multiple_of=math.lcm(batch_size, budgets.eot_attacked))
    settings = {"run": run.label, "model": run.architecture, "workdir": run.workdir,
                "epoch": run.epoch, "weights_sha256": run.weights_sha256,
                "num_examples": len(images), "batch_size": batch_size,
                "eps": eps, "step_size": step_size, "seed": seed,
                "budgets": {**dataclasses.asdict(budgets),
                            "mate_sizes": list(budgets.mate_sizes)}}
    parts = len(CHECKS) - 1 + len(budgets.mate_sizes) + 3  # worst: no part
    with tqdm.tqdm(total=parts * len(bn_modes), desc=run.label, unit="part",
                   disable=not show_progress) as progress:
        study = _Study(run, images, labels, batch_size=batch_size, eps=eps,
                       step_size=step_size, seed=seed, budgets=budgets, settings=settings,
                       cache_dir=cache_dir, progress=progress)
        modes = {mode: {"checks": study.checklist(mode), "harm": study.harm(mode),
                        "controls": study.controls(mode)} for mode in bn_modes}
    return {**settings, "square_corners": autoattack.SQUARE_CORNERS, "modes": modes}


# ------------------------------------------------------------------------------ report

def _cell(stats) -> str:
    return f"{100 * stats['accuracy']:.2f} ± {100 * stats['se']:.2f}"


def check_labels(budgets: dict) -> dict:
    """Row labels of the checklist with the budgets that produced them."""
    return {"clean": "clean", "pgd": "PGD-7", "apgd-ce": f"APGD-CE ({budgets['apgd_steps']})",
            "apgd-dlr": f"APGD-DLR ({budgets['apgd_steps']})",
            "square": f"Square ({budgets['square_queries']} queries)",
            "transfer": f"transfer from tracked ({budgets['transfer_attack']})",
            "eot": (f"EOT (k={budgets['eot_attacked']}, {budgets['eot_draws']} draws, "
                    f"{budgets['eot_steps']} steps)"),
            "worst": "worst case"}


def format_strict(studies) -> str:
    """Markdown: per run, the checklist, the harm curve and the controls (accuracy % ±
    binomial standard error), one column per BN mode."""
    lines = []
    for s in studies:
        modes = list(s["modes"])
        header = "| " + " | ".join(modes) + " |"
        bounded = "unbounded in [0, 1]" if s["budgets"]["mate_unbounded"] else (
            f"eps {s['eps']:.4g}")
        lines += [f"### {s['run']} ({s['model']}, epoch {s['epoch']}): {s['num_examples']} "
                  f"test images, batches of {s['batch_size']}, eps {s['eps']:.4g}", "",
                  "| check | threat model " + header, "|" + "---|" * (2 + len(modes))]
        labels = check_labels(s["budgets"])
        for name, threat in CHECKS.items():
            cells = [_cell(s["modes"][m]["checks"][name]) for m in modes]
            lines.append(f"| {labels[name]} | {threat} | " + " | ".join(cells) + " |")
        lines += ["", f"Harm to batch mates ({bounded}, {s['budgets']['mate_steps']} steps): "
                  "accuracy of the clean mates, without -> with the attacker's k images "
                  "perturbed (flipped: mates whose prediction changed):", "",
                  "| k | mates " + header, "|" + "---|" * (2 + len(modes))]
        for i, row in enumerate(s["modes"][modes[0]]["harm"]):
            cells = []
            for m in modes:
                r = s["modes"][m]["harm"][i]
                cells.append(f"{100 * r['clean']['accuracy']:.2f} -> {_cell(r['attacked'])}"
                             f" ({r['flipped']} flipped)")
            lines.append(f"| {row['k']} ({100 * row['fraction']:.0f}%) | "
                         f"{row['attacked']['n']} | " + " | ".join(cells) + " |")
        lines += ["", "Controls (clean / PGD-7):", "", "| batches | images " + header,
                  "|" + "---|" * (2 + len(modes))]
        for name, first in s["modes"][modes[0]]["controls"].items():
            cells = [f"{_cell(s['modes'][m]['controls'][name]['clean'])} / "
                     f"{_cell(s['modes'][m]['controls'][name]['pgd'])}" for m in modes]
            lines.append(f"| {name} | {first['clean']['n']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def plot_strict(studies):
    """Per run: the checklist as bars per BN mode (error bars: 1 s.e.), and the clean
    mates' accuracy against the attacker's share of the batch."""
    fig, axes = reports.new_figure(len(studies), 2, figsize=(12, 3.6 * len(studies)),
                                   squeeze=False)
    for (bars, harm), s in zip(axes, studies):
        modes = list(s["modes"])
        names = list(CHECKS)
        width = 0.8 / len(modes)
        for j, mode in enumerate(modes):
            checks = s["modes"][mode]["checks"]
            xs = np.arange(len(names)) + (j - (len(modes) - 1) / 2) * width
            bars.bar(xs, [100 * checks[n]["accuracy"] for n in names], width,
                     yerr=[100 * checks[n]["se"] for n in names], label=mode, capsize=2)
            rows = s["modes"][mode]["harm"]
            harm.errorbar([0] + [100 * r["fraction"] for r in rows],
                          [100 * checks["clean"]["accuracy"]]
                          + [100 * r["attacked"]["accuracy"] for r in rows],
                          yerr=[100 * checks["clean"]["se"]]
                          + [100 * r["attacked"]["se"] for r in rows],
                          marker="o", capsize=2, label=mode)
        labels = check_labels(s["budgets"])
        bars.set_xticks(np.arange(len(names)), [labels[n].split(" (")[0] for n in names],
                        rotation=30, ha="right", fontsize=8)
        bars.set_ylabel("accuracy (%)")
        bars.set_title(f"{s['run']}: strict checklist ({s['num_examples']} images)")
        harm.set_xlabel("attacker's share of the batch (%)")
        harm.set_ylabel("clean batch mates' accuracy (%)")
        harm.set_title(f"{s['run']}: harm to batch mates (B={s['batch_size']})")
        for ax in (bars, harm):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_strict(studies, output_dir: str) -> str:
    """``strict.json``, ``strict.md`` and ``strict.png`` into ``output_dir``; returns the
    Markdown."""
    tables = format_strict(studies)
    reports.write(output_dir, "strict", studies, tables)
    reports.save_figure(plot_strict(studies), output_dir, "strict", dpi=110)
    return tables
