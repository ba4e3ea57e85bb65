"""Training: what `python -m histodist.train` runs once the config is parsed.

build.py        a run from a Config: Accelerator, run folder, loaders, model, optimizer
loop.py         one epoch, one optimizer step, evaluation, checkpoints
optim.py        parameter groups, optimizers and per-step learning-rate schedules
checkpoint.py   full training states published atomically, resume and model loading
distributed.py  preemption signals, cross-rank flags and gathers, per-step seeds, determinism
tracking.py     metrics.jsonl, stdout summaries and W&B
resume.py       resume at a new layout (world size, per-process batch, accumulation steps)
"""
