"""Regenerate ANN-WS's lost checkpoints (epochs 3-42) from the kept epoch 2, in a folder of
their own: this machine retrains epoch 41 from 40 bit for bit (ws_determinism.py). Trains on
from the folder's latest checkpoint; ws_regen.sh stops it once epoch 42 is saved."""
import os

import ml_collections

from awn_jax.training import checkpointing
from awn_jax.training.loop import train_and_evaluate

FOLDER = os.path.expanduser("~/awn-runs/ws-regen")
config = ml_collections.ConfigDict(checkpointing.load_config_dict(FOLDER))
config.workdir = FOLDER
train_and_evaluate(config, FOLDER)
