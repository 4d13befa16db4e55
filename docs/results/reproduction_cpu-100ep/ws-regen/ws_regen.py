"""Regenerate ANN-WS's lost checkpoints (epochs 3-42) from the kept epoch 2, in its own
folder: this machine retrains epoch 41 from 40 bit for bit (notes/ws_determinism.py). Stops
after epoch 42; resumes from its latest checkpoint."""
import json, os
import ml_collections
from awn_jax.training.loop import train_and_evaluate
S = os.path.expanduser("~/awn-runs/ws-regen")
config = ml_collections.ConfigDict(json.load(open(os.path.join(S, "config.json"))))
config.workdir = S
train_and_evaluate(config, S)
