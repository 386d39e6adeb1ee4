"""Offline half of lidar-completion: data, metrics, teacher training, Distillation-DPO, evaluation."""

__version__ = "0.1.0"
