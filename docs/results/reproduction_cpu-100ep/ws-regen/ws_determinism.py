"""Does this machine retrain ANN-WS's epoch 41 from the kept epoch-40 checkpoint bit for bit?
(The lost WS epochs 3-42 can then be regenerated exactly.) Set up once: a folder
~/awn-runs/ws-determinism with the run's checkpoints/40, config.json, dataset_info.json and
the first 40 lines of its metrics.jsonl."""
import json
import os
import time

import ml_collections
import numpy as np

from awn_jax.model import named_leaves
from awn_jax.training import checkpointing
from awn_jax.training.loop import train_and_evaluate
from awn_jax.training.runs import load_run

SCRATCH = os.path.expanduser("~/awn-runs/ws-determinism")
ORIGINAL = os.path.expanduser("~/awn-runs/cpu-100ep/adder-ws")

config = ml_collections.ConfigDict(checkpointing.load_config_dict(SCRATCH))
config.workdir = SCRATCH
if not os.path.isdir(os.path.join(SCRATCH, "checkpoints", "41")):
    train_and_evaluate(config, SCRATCH, deadline=time.time())  # one epoch: 41
again, kept = load_run(SCRATCH, 41), load_run(ORIGINAL, 41)
for what in ("params", "batch_stats"):
    x, y = named_leaves(getattr(again, what)), named_leaves(getattr(kept, what))
    equal = all(np.array_equal(np.asarray(x[k]), np.asarray(y[k])) for k in y)
    worst = max(float(np.max(np.abs(np.asarray(x[k]) - np.asarray(y[k])))) for k in y)
    print(what, "bit-equal" if equal else "differ", "max abs diff", worst)
new = [json.loads(line) for line in open(os.path.join(SCRATCH, "metrics.jsonl"))][-1]
old = [json.loads(line) for line in open(os.path.join(ORIGINAL, "metrics.jsonl"))][40]
print("epoch", new["epoch"], old["epoch"], "train_loss", new["train_loss"], old["train_loss"],
      "test_acc", new["test_accuracy"], old["test_accuracy"])
