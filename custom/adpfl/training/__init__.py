from adpfl.training.loop import LocalTrainer, TrainConfig, resolve_device

__all__ = ["LocalTrainer", "TrainConfig", "resolve_device"]
