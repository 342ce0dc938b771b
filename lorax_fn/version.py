"""The library version, recorded in checkpoints and PEFT headers."""

__version__ = "0.1.0"
