"""bridgeta: pure-PyTorch cross-modal knowledge distillation for BEV perception."""

__version__ = "0.1.0"
