"""Inference: one trained run, many inputs (used by evaluate, predict, explain, export, embed).

core.py     batched inference over shards or image files
report.py   evaluation reports (histodist.metrics plus CI, Youden, calibration, groups), figures
gradcam.py  Grad-CAM heat maps
knn.py      k-nearest-neighbour probe on embedding shards
"""
