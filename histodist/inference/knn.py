"""k-nearest-neighbour probe on embedding shards (`evaluate --knn K` on a head's run).

A second, training-free reading of the same embeddings: each evaluated vector takes the K most
cosine-similar training vectors and their labels, weighted by exp(similarity / T) with T = 0.07
(the weighting of DINO's k-NN evaluation, Caron et al., 2021); the weights summed per class and
normalised are its class probabilities.
"""

from __future__ import annotations

import numpy as np
import torch

TEMPERATURE = 0.07


def load_vectors(shards: str, split: str, batch_size: int = 1024) -> tuple[torch.Tensor, ...]:
    """(vectors float32 (N, D), labels int64 (N,)) of an embedding split, in shard order."""
    from histodist.data.loader import eval_loader

    xs, ys = [], []
    loader = eval_loader(shards, split, batch_size=batch_size, rank=0, world_size=1, workers=0)
    for batch in loader:
        xs.append(batch["image"].flatten(1).float())
        ys.append(batch["label"])
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def knn_probs(
    train_x: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor, *, k: int, num_classes: int,
    temperature: float = TEMPERATURE, chunk: int = 1024,
) -> torch.Tensor:  # fmt: skip
    """Class probabilities float32 (N, C) of x (N, D) from its k most cosine-similar rows of
    train_x (M, D) with labels train_y (M,) in [0, C); chunked so N x M never materialises."""
    ref = torch.nn.functional.normalize(train_x.float(), dim=1)
    k = min(k, len(ref))
    out = []
    for part in torch.split(torch.nn.functional.normalize(x.float(), dim=1), chunk):
        sim, idx = (part @ ref.T).topk(k, dim=1)
        votes = torch.zeros(len(part), num_classes)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        out.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(out)


def knn_report(run, shards: str, split: str, k: int, *, n_boot: int, seed: int) -> dict:
    """The evaluation report of the k-NN probe: the run's training split as the reference,
    `shards`/`split` evaluated (labelled samples only)."""
    from histodist.inference.report import classification_report

    tx, ty = load_vectors(run.cfg.data.shards, run.cfg.data.train_split)
    x, y = load_vectors(shards, split)
    keep, tkeep = y >= 0, ty >= 0
    probs = knn_probs(tx[tkeep], ty[tkeep], x[keep], k=k, num_classes=len(run.classes))
    rep = classification_report(probs.numpy(), y[keep].numpy().astype(np.int64), run.classes,
                                n_boot=n_boot, seed=seed)  # fmt: skip
    return {"k": k, "temperature": TEMPERATURE, "reference": f"{run.cfg.data.shards}:"
            f"{run.cfg.data.train_split}", **rep}  # fmt: skip
