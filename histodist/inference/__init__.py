"""Inference: one trained run, many inputs (used by evaluate, predict, explain, export, embed).

core.py     batched inference over shards or image files
report.py   evaluation metrics and figures over gathered predictions
gradcam.py  Grad-CAM heat maps
knn.py      k-nearest-neighbour probe on embedding shards
"""
