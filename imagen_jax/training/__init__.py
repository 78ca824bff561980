"""Training of every cascade stage: the sharded train step (step.py) and the loop (loop.py)."""
from imagen_jax.training.loop import TrainingError, train
from imagen_jax.training.step import (TrainState, Trainer, count_state_params, drop_text, ema_decay, global_norm,
                                      lower_train_step, lr_schedule, make_optimizer, model_config, model_flops)

__all__ = ["TrainState", "Trainer", "TrainingError", "count_state_params", "drop_text", "ema_decay", "global_norm",
           "lower_train_step", "lr_schedule", "make_optimizer", "model_config", "model_flops", "train"]
