"""Join the regenerated ANN-WS records to the run's: every epoch both have (2, 31, 34, 40,
41) must come from the same weights (the records' ``weights_sha256``, a hash of the
checkpoint's parameters and BN statistics); then the records of the lost epochs up to the
latest such epoch are copied into the run's ``records/``. Copies nothing on a mismatch.
Run it again as the regeneration goes on; it prints what it compared and copied."""
import json
import os
import shutil

RUN = os.path.expanduser("~/awn-runs/cpu-100ep/adder-ws/records")
REGEN = os.path.expanduser("~/awn-runs/ws-regen/records")


def records(folder):
    found = {}
    for name in os.listdir(folder):
        if name.startswith("epoch-") and name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                found[int(name[len("epoch-"):-len(".json")])] = json.load(f)
    return found


run, regen = records(RUN), records(REGEN)
both = sorted(set(run) & set(regen))
for epoch in both:
    same = (run[epoch]["weights_sha256"] == regen[epoch]["weights_sha256"]
            and run[epoch]["settings"] == regen[epoch]["settings"])
    print(f"epoch {epoch}: {'same weights' if same else 'DIFFERENT weights or settings'}")
    if not same:
        raise SystemExit("the regeneration differs from the run: nothing copied")
verified = max(both)
lost = sorted(e for e in regen if e not in run and e < verified)
for epoch in lost:
    shutil.copy(os.path.join(REGEN, f"epoch-{epoch}.json"), RUN)
print(f"verified up to epoch {verified}; copied the records of epochs {lost or 'none'}")
