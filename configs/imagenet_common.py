"""The ImageNet (ILSVRC-2012) ResNet-18 recipe shared by the imagenet_r18_* configs.

The official AdderNet repository (huawei-noah/AdderNet) has no ImageNet training script:
its main.py trains ResNet-20 on CIFAR-10 only, and its README sends ImageNet users to
pytorch/examples/imagenet for data preparation and ships an evaluation script (test.py).
So this is the standard ResNet ImageNet recipe of pytorch/examples/imagenet (batch 256,
SGD momentum 0.9, lr 0.1, weight decay 1e-4, 90 epochs), with the per-epoch cosine decay
of the CIFAR recipe in place of the step decay. Data: TFDS imagenet2012 (manual download),
random-resized-crop 224 + flip for training, resize 256 + center crop 224 for evaluation.
"""

from configs import default


def resnet18_config(layer_type, workdir):
    """This recipe with the given layer type (a helper for the config files, not one itself)."""
    config = default.get_config()
    config.dataset = "imagenet2012"
    config.normalization = "imagenet2012"
    config.image_size = 224
    config.crop_padding = 0             # unused: training crops are random-resized crops
    config.model = "resnet18"
    config.layer_type = layer_type
    config.batch_size = 256
    config.num_epochs = 90
    config.learning_rate = 0.1
    config.weight_decay = 1e-4
    config.eval_batch_size = 200        # divides the 50,000 validation images and 8 devices
    config.max_checkpoints_to_keep = 5  # ~100 MB each; the stability studies are on CIFAR
    config.log_every_steps = 100
    config.workdir = workdir
    return config
