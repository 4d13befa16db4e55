"""A seconds-long run for checking the whole pipeline on a CPU: synthetic data, ResNet-20 AWN.

Small 16x16 images keep the adder layers cheap (they run far below convolution speed on a
CPU); one epoch is 4 steps of 64 examples.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.dataset = "synthetic"
    config.normalization = "dataset"
    config.synthetic_num_train = 256
    config.synthetic_num_test = 128
    config.synthetic_num_classes = 10
    config.image_size = 16
    config.crop_padding = 2
    config.batch_size = 64
    config.num_epochs = 2
    config.eval_batch_size = 64
    config.log_every_steps = 1
    config.workdir = "workdirs/smoke"
    return config
