"""Does this machine retrain ANN-WS's epoch 41 from the kept epoch-40 checkpoint bit for bit?
(The lost WS epochs 3-42 could then be regenerated exactly.)"""
import json, os, time
import jax, ml_collections, numpy as np
from awn_jax.training.loop import train_and_evaluate
from awn_jax.training.runs import load_run
from awn_jax.model import named_leaves
S = os.path.expanduser("~/awn-runs/ws-determinism")
ORIG = os.path.expanduser("~/awn-runs/cpu-100ep/adder-ws")
config = ml_collections.ConfigDict(json.load(open(os.path.join(S, "config.json"))))
config.workdir = S
if not os.path.isdir(os.path.join(S, "checkpoints", "41")):
    train_and_evaluate(config, S, deadline=time.time())
a, b = load_run(S, 41), load_run(ORIG, 41)
for what in ("params", "batch_stats"):
    x, y = named_leaves(getattr(a, what)), named_leaves(getattr(b, what))
    equal = all(np.array_equal(np.asarray(x[k]), np.asarray(y[k])) for k in y)
    worst = max(float(np.max(np.abs(np.asarray(x[k]) - np.asarray(y[k])))) for k in y)
    print(what, "bit-equal" if equal else "differ", "max abs diff", worst)
m = [json.loads(l) for l in open(os.path.join(S, "metrics.jsonl"))][-1]
o = [json.loads(l) for l in open(os.path.join(ORIG, "metrics.jsonl"))][40]
print("epoch", m["epoch"], o["epoch"], "train_loss", m["train_loss"], o["train_loss"], "test_acc", m["test_accuracy"], o["test_accuracy"])
