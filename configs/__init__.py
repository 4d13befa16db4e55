"""Experiment configs: one get_config() per file; variants start from default.py.

Load them as the command-line tools do, from the repository root:
`--config=configs/cifar10_r20_cnn.py --config.num_epochs=1`.
"""
