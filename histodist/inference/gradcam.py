"""Grad-CAM (Selvaraju et al., 2017) with forward hooks: where a CNN or ViT looked for a class.

The heatmap of image b for class c is ReLU(sum_k w_k A_k), where A is the activation of a
convolutional layer and w_k the spatial mean of d logit_c / d A_k; it is upsampled to the input
size and scaled to [0, 1] per image. Hand-written (about 40 lines) rather than the `grad-cam`
package, which pulls in OpenCV for the same computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histodist.metrics import predicted_class


def _vit(model: nn.Module) -> nn.Module | None:
    """The timm ViT inside `model` (itself, or the backbone of hub.ClsMeanPool), else None."""
    vit = getattr(model, "backbone", model)
    return vit if hasattr(vit, "blocks") and hasattr(vit, "num_prefix_tokens") else None


def _token_map(t: torch.Tensor, prefix: int) -> torch.Tensor:
    """ViT tokens (B, prefix + h*w, D) -> patch-token map (B, D, h, w) of a square grid."""
    patches = t[:, prefix:]
    side = int(round(patches.shape[1] ** 0.5))
    return patches.transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)


def default_layer(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The module whose output is the last feature map (4-D, more than 1x1) in the forward pass
    of ``x``: for timm ResNets the last stage, for plain CNNs the last conv block; for ViTs the
    input of the last transformer block (its patch tokens are the map). Running the model once finds it
    whatever the architecture names its modules."""
    vit = _vit(model)
    if vit is not None:
        # The last block's input (after its first norm): with class-token pooling the last
        # block's output patch tokens reach no logit, so their gradient is zero.
        return getattr(vit.blocks[-1], "norm1", vit.blocks[-1])
    seen: list[nn.Module] = []

    def hook(module, _inp, out):
        if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[-1] * out.shape[-2] > 1:
            seen.append(module)

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ValueError(f"{type(model).__name__}: no 4-D feature map for Grad-CAM; pass a layer")
    return seen[-1]


def gradcam(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | None = None,
    layer: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM heatmaps of a normalised float batch x (B, 3, H, W), model in eval mode.

    ``target``: int64 (B,) class per image (default: the predicted class). Returns
    (heatmaps float32 (B, H, W) in [0, 1], logits float32 (B, C)), on x's device.
    """
    layer = layer if layer is not None else default_layer(model, x)
    store: dict[str, torch.Tensor] = {}

    def hook(_module, _inp, out):
        store["act"] = out
        out.register_hook(lambda g: store.__setitem__("grad", g))

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))
            if target is None:
                target = predicted_class(logits.detach().float().softmax(1))
            logits.gather(1, target.view(-1, 1)).sum().backward()
    finally:
        handle.remove()
    act, grad = store["act"].detach(), store["grad"]
    if act.ndim == 3:  # ViT tokens: the patch tokens laid out on their grid
        prefix = int(_vit(model).num_prefix_tokens)
        act, grad = _token_map(act, prefix), _token_map(grad, prefix)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).float(), logits.detach().float()
