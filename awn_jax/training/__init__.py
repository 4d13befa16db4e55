"""Training: the data-parallel loop, its state and optimizer, checkpoints, metrics, and
loading a finished run back for evaluation.

* :mod:`.loop` -- ``train_and_evaluate(config, workdir)``.
* :mod:`.config_checks` -- every config key's range, checked before a workdir is written.
* :mod:`.state` -- the train state and its creation.
* :mod:`.optimizer` -- the official SGD chain, its schedules, the AWN lr multiplier.
* :mod:`.checkpointing` -- Orbax checkpoints and the run's saved config.
* :mod:`.metrics` -- ``metrics.jsonl`` and TensorBoard scalars.
* :mod:`.runs` -- a saved run loaded back (config, dataset, model of any epoch).

The package imports none of them, so loading a run's checkpoints (``.checkpointing``, as
the analyses do) does not load the trainer.
"""
