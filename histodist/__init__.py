"""histodist: train cancer-detection image classifiers from one GPU to multi-node clusters."""

__version__ = "0.1.0"
