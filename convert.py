"""Convert a PyTorch checkpoint of the official AdderNet or of the public CIFAR ResNet CNNs into
a shipped-model ``.npz`` of this project (awn_jax.pretrained), checked as it is written.

    pip install -e '.[torch]'          # reading .pth files needs PyTorch (the CPU build)
    python convert.py ResNet20-AdderNet.pth --name my_addernet_r20 --output_dir my_models
    python convert.py resnet20-12fca82f.th --name my_cnn --output_dir my_models \\
        --data_dir ~/cifar10 --num_examples 2000        # + clean accuracy per BN mode

Accepted (the family and depth are read off the names and shapes): huawei-noah/AdderNet's
``resnet20.py`` and ``resnet50.py`` state_dicts (adder kernels ``*.adder``; ResNet-50 is the
ImageNet model its README links) and akamaster/pytorch_resnet_cifar10's ResNet-20/32/56
(``linear`` head, option-A shortcuts); ``DataParallel``'s ``module.`` prefix and a
``{"state_dict": ...}`` wrapper are fine. A file of another architecture, a truncated file
or a state_dict with missing or extra entries gives one line saying so.

The model then loads with ``awn_jax.pretrained.load(NAME, directory=OUTPUT_DIR)`` or
``evaluate.py --pretrained NAME`` (for models in the package's weights folder).
"""

import json
import os
import sys

from absl import flags

from awn_jax import cli, pretrained
from awn_jax.errors import UserError
from awn_jax.pretrained import convert
from awn_jax.training.runs import Run

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from configs import default  # noqa: E402  (the repository's default config)

_NAME = flags.DEFINE_string("name", None, "Name of the converted model (file NAME.npz).",
                            required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", pretrained.WEIGHTS_DIR,
                                  "Where NAME.npz and manifest.json go.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "CIFAR-10 image folder: measure the clean "
                                "accuracy per BN mode and record it in the manifest.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 2000, "Test images for the accuracy.",
                                     lower_bound=1)
_PROVENANCE = flags.DEFINE_string("provenance", None, "JSON file of facts about the source "
                                  "(repository, commit, license, stated accuracy, recipe) to "
                                  "record in the manifest entry.")


def main(argv):
    if len(argv) != 2:
        raise UserError("pass one checkpoint file: python convert.py CHECKPOINT --name NAME")
    path = argv[1]
    state_dict = convert.read_state_dict(path)
    config, info, graphdef, params, batch_stats = convert.convert(state_dict,
                                                                  default.get_config())
    details = {"source": {"file": os.path.basename(path),
                          "sha256": pretrained.file_sha256(path),
                          "num_batches_tracked": convert.batches_tracked(state_dict),
                          "family": convert.detect(state_dict)[0].name}}
    if _PROVENANCE.value:
        with open(_PROVENANCE.value) as f:
            details["source"].update(json.load(f))
    # The epoch of a shipped model: its recipe's, when the provenance states it.
    epoch = int(details["source"].get("epochs", 0))
    run = Run(f"converted:{_NAME.value}", config, None, epoch, graphdef, params, batch_stats)
    details["command"] = " ".join(["python", *sys.argv])
    entry = pretrained.export(run, _NAME.value, _OUTPUT_DIR.value, info=info, **details)
    loaded = pretrained.load(_NAME.value, data_dir=_DATA_DIR.value, directory=_OUTPUT_DIR.value)
    if _DATA_DIR.value:
        batch = min(500, _NUM_EXAMPLES.value)
        images, labels = loaded.test_set(_NUM_EXAMPLES.value, multiple_of=batch)
        entry = pretrained.export(run, _NAME.value, _OUTPUT_DIR.value, info=info,
                                  clean_accuracy={mode: loaded.evaluator.accuracy(
                                      images, labels, batch_size=batch, bn_mode=mode)
                                      for mode in ("tracked", "running-mean", "running")},
                                  test_examples=len(images), test_batch_size=batch,
                                  test_images="the first N of the fixed test order "
                                  "(awn_jax.data: seed 2021)", **details)
    print(f"{_NAME.value}: {config.model} {config.layer_type} ({details['source']['family']}), "
          f"written to {os.path.join(_OUTPUT_DIR.value, entry['file'])}"
          + (f"; clean accuracy {entry['clean_accuracy']}" if _DATA_DIR.value else ""))


if __name__ == "__main__":
    cli.run(main)
