"""histodist: train cancer-detection image classifiers from one GPU to multi-node clusters.

The data flow and its subpackages: ingest/ (raw datasets -> WebDataset shards), data/ (shards
-> batches on one rank), training/ (what `histodist.train` runs), inference/ (a trained run
applied to shards or images); bench/ measures them. The command-line entry points are the
top-level modules shard, train, lr_find, evaluate, predict, explain, export and embed; config,
augment, models, hub and metrics are shared by several of them. docs/architecture.md maps
every module.
"""

__version__ = "0.1.0"
