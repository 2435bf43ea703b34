"""Training: datasets as preloaded tensors, models, schedules, the trainer and its artifacts.

Knows nothing of Optuna or MLflow: ``trainer.train(cfg, splits, on_epoch=...)`` returns a
``TrainResult``, and ``artifacts`` turns it into files.
"""
