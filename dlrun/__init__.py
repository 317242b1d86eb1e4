"""dlrun: a command-line experiment runner for deep learning (train, eval, quantize, export, bench)."""

__version__ = "0.1.0"
