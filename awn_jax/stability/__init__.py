"""Stability and variance studies of trained runs (the paper's Fig. 1-3 and Sec. 3).

Each study returns a JSON-serializable dict and draws a matplotlib figure; ``analyze.py``
writes both into an output directory:

* :mod:`.interpolation` -- accuracy and loss along the straight line between two
  checkpoints of a run (Fig. 2c), with BN statistics interpolated or re-estimated.
* :mod:`.curves` -- test loss and accuracy per epoch of several runs (Fig. 1a, 2d).
* :mod:`.distributions` -- weight histograms with Laplace/Gaussian fits (Fig. 1c-d),
  features before BN across epochs (Fig. 3), BN running statistics and their drift.
* :mod:`.theory` -- the Monte Carlo check of Sec. 3 (``awn_jax.stability.variance_theory``) with a
  figure of where the Eq. 7-8 bounds hold.
"""
