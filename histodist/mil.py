"""Multiple-instance learning heads on slide bags of tile embeddings (histodist.data.bags).

Every head maps a bag, float (B, N, D) with B = 1 in training and evaluation (one slide,
N tiles of D-dim embeddings), to slide logits (B, C) and scores each tile:

- `abmil`: gated attention pooling (Ilse, Tomczak & Welling, "Attention-based Deep Multiple
  Instance Learning", ICML 2018): h = ReLU(W x); a = w^T (tanh(V h) * sigmoid(U h));
  slide = classifier(sum softmax(a)_i h_i). Widths as CLAM's "small" attention net
  (mahmoodlab/CLAM models/model_clam.py, Attn_Net_Gated): H = --mil-dim, attention H / 2.
- `clam-sb`: CLAM single-branch (Lu et al., "Data-efficient and weakly supervised
  computational pathology on whole-slide images", Nature BME 2021; CLAM_SB in
  models/model_clam.py): the gated attention pooling above plus one instance classifier per
  class; the --clam-k most and least attended tiles of a slide of class c are pseudo-labelled
  1 and 0 for classifier c (and, for more than two classes, CLAM's "subtyping" rule: the most
  attended tiles are 0 for every other class's classifier); the loss is
  bag_weight x CE(slide) + (1 - bag_weight) x CE(instances), bag_weight 0.7 as CLAM's
  default. k is clipped to half the bag so top and bottom never overlap on small bags.
- `transmil`: TransMIL (Shao et al., "TransMIL: Transformer based Correlated Multiple
  Instance Learning for Whole Slide Image Classification", NeurIPS 2021;
  szc19990412/TransMIL models/TransMIL.py): fc to H, the bag padded to a square by repeating
  its first tiles, a class token, a transformer layer, the PPEG positional encoding (7/5/3
  depthwise convolutions over the square), a second layer, LayerNorm, the class token to the
  classifier. The Nystrom approximation of the original is replaced by exact attention
  (torch's scaled_dot_product_attention, whose memory-efficient kernels fit bags of 10^4+
  tiles), and its value-residual convolution is left out. Tile scores: the class token's
  attention in the last layer, averaged over the heads, a repeated tile's share added to it.
- `mean` / `max`: instance-level baselines: h = ReLU(W x), instance logits classifier(h);
  the slide logits are their mean (the same as the classifier on the mean embedding), or the
  logits of the instance most confidently positive (two classes; for more, the instance with
  the highest class probability), as CLAM's MIL_fc / MIL_fc_mc (models/model_mil.py) and
  Campanella et al., Nature Medicine 2019. Tile scores: the instance probability of class 1
  (two classes) or of the slide's predicted class.

`forward(x)` returns the slide logits (so validation, evaluate and predict call a MIL head as
any classifier); `forward(x, label=y)` returns (logits, auxiliary loss), the training loop's
call (CLAM's instance loss; 0 for the others, kept in the graph so DDP sees every parameter
used); `bag(x)` returns a MILOutput with the tile scores (heatmaps).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

MIL_HEADS = ("abmil", "clam-sb", "transmil", "mean", "max")
TRANSMIL_HEADS = 8  # attention heads, as the reference (dim_head = dim / 8)


class MILOutput(NamedTuple):
    """logits float (B, C); scores float (B, N): per-tile attention (attention heads, each
    row sums to 1) or instance probability (mean / max); aux_loss: scalar (0 without one)."""

    logits: torch.Tensor
    scores: torch.Tensor
    aux_loss: torch.Tensor


class MILHead(nn.Module):
    """Base of the heads: subclasses implement `bag`."""

    pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # unused: no images

    def bag(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None):
        """x float (B, N, D) -> logits (B, C); with `label` int64 (B,): (logits, aux_loss)."""
        out = self.bag(x.float(), label)
        return out.logits if label is None else (out.logits, out.aux_loss)


def _embed(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))


class GatedAttention(nn.Module):
    """a_i = w^T (tanh(V h_i) * sigmoid(U h_i)) (Ilse et al. 2018, eq. 9): (B, N, H) -> (B, N)."""

    def __init__(self, hidden: int, attn: int, dropout: float):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(hidden, attn), nn.Tanh(), nn.Dropout(dropout))
        self.b = nn.Sequential(nn.Linear(hidden, attn), nn.Sigmoid(), nn.Dropout(dropout))
        self.c = nn.Linear(attn, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(h) * self.b(h)).squeeze(-1)


class ABMIL(MILHead):
    """Gated attention MIL (Ilse et al. 2018)."""

    def __init__(self, dim: int, num_classes: int, *, hidden: int = 512, dropout: float = 0.0):
        super().__init__()
        self.embed = _embed(dim, hidden, dropout)
        self.attention = GatedAttention(hidden, hidden // 2, dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tile features h (B, N, H), attention softmax over the tiles (B, N))."""
        h = self.embed(x)
        return h, self.attention(h).float().softmax(-1)

    def bag(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        h, a = self.attend(x)
        logits = self.classifier(torch.einsum("bn,bnh->bh", a.to(h.dtype), h))
        return MILOutput(logits, a, logits.new_zeros(()))


class CLAMSB(ABMIL):
    """CLAM single branch (Lu et al. 2021): ABMIL plus the instance clustering loss."""

    def __init__(self, dim: int, num_classes: int, *, hidden: int = 512, dropout: float = 0.0,
                 k: int = 8):  # fmt: skip
        super().__init__(dim, num_classes, hidden=hidden, dropout=dropout)
        self.num_classes, self.k = num_classes, k
        # CLAM's one Linear(H, 2) per class, stacked: every classifier is in the graph of
        # every step (DDP needs each parameter used), the unused ones masked out of the loss.
        self.instance = nn.Linear(hidden, 2 * num_classes)

    def bag(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        h, a = self.attend(x)
        logits = self.classifier(torch.einsum("bn,bnh->bh", a.to(h.dtype), h))
        aux = logits.new_zeros(())
        if label is not None:
            aux = torch.stack([self.instance_loss(h[i], a[i], label[i]) for i in range(len(h))])
            aux = aux.mean()
        return MILOutput(logits, a, aux)

    def instance_loss(self, h: torch.Tensor, a: torch.Tensor, label: torch.Tensor):
        """CLAM's instance loss of one slide: h (N, H), attention a (N,), label int64 ()."""
        k = min(self.k, len(a) // 2)
        if k == 0:  # a one-tile bag (or a padding bag): nothing to cluster
            return 0.0 * self.instance(h[:1]).sum()
        top, bottom = a.topk(k).indices, (-a).topk(k).indices
        out = self.instance(h[torch.cat([top, bottom])]).view(2 * k, self.num_classes, 2)
        # in the class: the top k are positive, the bottom k negative, for its own classifier
        targets = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
        loss = F.cross_entropy(out[:, label].float(), targets)
        if self.num_classes > 2:  # subtyping: the top k are negative for every other class
            others = [c for c in range(self.num_classes) if c != int(label)]
            neg = out[:k, others].float().reshape(-1, 2)
            loss = (loss + F.cross_entropy(neg, torch.zeros(len(neg), dtype=torch.long,
                                                            device=h.device)) * len(others)
                    ) / self.num_classes  # fmt: skip
        return loss


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention; `cls_attention`
    gives the attention of token 0 (the class token) over every token, averaged over heads."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor):
        b, n, d = x.shape
        return self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.out(y.transpose(1, 2).flatten(2))

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) -> float32 (B, T): softmax(q_0 k^T / sqrt(d)), mean over the heads."""
        q, k, _ = self._qkv(x)
        with torch.autocast(x.device.type, enabled=False):  # scores in float32
            logits = (q[:, :, :1].float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
            return logits.softmax(-1).mean(1)[:, 0]


class TransLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding generator (TransMIL): depthwise 7/5/3 convolutions over the
    tiles laid out on a square, added to them; the class token passes through."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, _, c = x.shape
        cls, feat = x[:, :1], x[:, 1:].transpose(1, 2).reshape(b, c, side, side)
        feat = feat + sum(conv(feat) for conv in self.convs)
        return torch.cat([cls, feat.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(MILHead):
    """TransMIL (Shao et al. 2021) with exact attention; see the module docstring."""

    def __init__(self, dim: int, num_classes: int, *, hidden: int = 512, dropout: float = 0.0):
        super().__init__()
        if hidden % TRANSMIL_HEADS:
            raise ValueError(f"transmil: --mil-dim {hidden} must divide by {TRANSMIL_HEADS}")
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden))
        self.layer1 = TransLayer(hidden, TRANSMIL_HEADS, dropout)
        self.pos = PPEG(hidden)
        self.layer2 = TransLayer(hidden, TRANSMIL_HEADS, dropout)
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def bag(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        h = self.embed(x)
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        # The reference's padding: the first side^2 - n tiles again (side^2 - n < n for n > 1).
        extra = side * side - n
        h = torch.cat([h, h[:, :extra]], dim=1) if extra else h
        h = torch.cat([self.cls_token.expand(len(h), -1, -1).to(h.dtype), h], dim=1)
        h = self.pos(self.layer1(h), side)
        with torch.no_grad():  # the scores are read, never trained
            attn = self.layer2.attn.cls_attention(self.layer2.norm(h))[:, 1:]
        h = self.layer2(h)
        logits = self.classifier(self.norm(h)[:, 0])
        scores = attn[:, :n].clone()
        if extra:  # a repeated tile's attention is its own
            scores[:, :extra] += attn[:, n:]
        scores = scores / scores.sum(-1, keepdim=True)
        return MILOutput(logits, scores, logits.new_zeros(()))


class InstancePool(MILHead):
    """Instance classifier, then mean or max pooling of the instance logits."""

    def __init__(self, dim: int, num_classes: int, *, pool: str, hidden: int = 512,
                 dropout: float = 0.0):  # fmt: skip
        super().__init__()
        if pool not in ("mean", "max"):
            raise ValueError(f"pool must be mean or max, not {pool!r}")
        self.pool = pool
        self.embed = _embed(dim, hidden, dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def bag(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        inst = self.classifier(self.embed(x))  # (B, N, C)
        probs = inst.float().softmax(-1)
        if self.pool == "mean":
            logits = inst.mean(1)
        else:
            conf = probs[..., 1] if probs.shape[-1] == 2 else probs.amax(-1)
            top = conf.argmax(1)
            logits = inst[torch.arange(len(inst)), top]
        if probs.shape[-1] == 2:
            scores = probs[..., 1]
        else:  # the instances' probability of the slide's predicted class
            pred = logits.argmax(-1).view(-1, 1, 1).expand(-1, probs.shape[1], 1)
            scores = probs.gather(-1, pred)[..., 0]
        return MILOutput(logits, scores, logits.new_zeros(()))


def build(name: str, *, dim: int, num_classes: int, hidden: int = 512, dropout: float = 0.0,
          k: int = 8) -> MILHead:  # fmt: skip
    """The MIL head `name` (one of MIL_HEADS) on `dim`-wide tile embeddings."""
    if dim <= 0:
        raise ValueError("a MIL head needs embed_dim > 0 (from the embedding manifest)")
    if name == "abmil":
        return ABMIL(dim, num_classes, hidden=hidden, dropout=dropout)
    if name == "clam-sb":
        return CLAMSB(dim, num_classes, hidden=hidden, dropout=dropout, k=k)
    if name == "transmil":
        return TransMIL(dim, num_classes, hidden=hidden, dropout=dropout)
    if name in ("mean", "max"):
        return InstancePool(dim, num_classes, pool=name, hidden=hidden, dropout=dropout)
    raise ValueError(f"unknown MIL head {name!r}; choose one of {', '.join(MIL_HEADS)}")
