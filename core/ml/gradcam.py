"""Grad-CAM for the DenseNet head, computed from forward activations alone (no backward pass)."""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

TARGET_LAYER = "features.norm5"


def gradcam_weights(activations: torch.Tensor, fc_weight: torch.Tensor) -> torch.Tensor:
    """Returns the Grad-CAM channel weights α[n,k] for the logit w·GAP(ReLU(A)) + b.

    ∂logit/∂A[k,i,j] = w_k·1[A>0]/(H·W), so α_k, the spatial mean of that gradient,
    is w_k · (fraction of positive cells in channel k) / (H·W).
    """
    h, w = activations.shape[-2:]
    positive_fraction = (activations > 0).float().mean(dim=(2, 3))
    return fc_weight.view(1, -1).float() * positive_fraction / (h * w)


def normalize_maps(cams: torch.Tensor) -> torch.Tensor:
    """Scales each map to 0..1 (min-max per image, as pytorch-grad-cam does)."""
    flat = cams.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    cams = cams - lo
    hi = cams.flatten(1).max(dim=1).values.view(-1, 1, 1)
    return cams / (hi + 1e-7)


def gradcam_maps(activations: torch.Tensor, fc_weight: torch.Tensor) -> torch.Tensor:
    """Returns normalised Grad-CAM maps [N,h,w] from norm5 activations [N,C,h,w]."""
    a = activations.float()
    alpha = gradcam_weights(a, fc_weight)
    cams = F.relu(torch.einsum("nk,nkhw->nhw", alpha, a))
    return normalize_maps(cams)


def forward_with_cam(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs DenseNet once and returns (logits [N], normalised CAMs [N,h,w]) from the same activations."""
    logits, cams, _ = forward_with_cam_embedding(net, x)
    return logits, cams


def forward_with_cam_embedding(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like forward_with_cam, and also returns the pooled features.norm5 embedding [N,C] the head sees.

    The embedding feeds the out-of-distribution guard (core.ml.ood) at no extra network cost.
    """
    activations = net.features(x)  # output of features.norm5
    pooled = F.adaptive_avg_pool2d(F.relu(activations), 1).flatten(1)
    logits = net.classifier(pooled).squeeze(1)
    return logits.float(), gradcam_maps(activations, net.classifier.weight), pooled.float()


# The heat-map's longer side when shown. A Grad-CAM map is 7×7, so a film-sized map holds no more detail than this,
# and at a DICOM film's 2,000–3,000 px it cost more CPU than the network's forward pass (about 220 ms a film on a
# 2-core server) and megabytes per page view. The study page stretches it over the film (same aspect ratio).
HEATMAP_MAX_SIDE = 512


def heatmap_size(size: tuple[int, int], max_side: int = HEATMAP_MAX_SIDE) -> tuple[int, int]:
    """The (width, height) a heat-map is shown at for a film of `size`: the film's own size, scaled down (never
    up) so that its longer side is at most `max_side`, keeping the aspect ratio."""
    width, height = size
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def cam_png(cam: np.ndarray | torch.Tensor) -> bytes:
    """Encodes a 0..1 CAM at its own grid (7×7 at 224 px) as an 8-bit grayscale PNG: what a worker stores.

    The map is upsampled only when a page shows it (upsample_cam). Upsampled here, to up to 512 px, it cost a
    worker 1.7 ms a film at 300×256 and 4.9 ms at 512 px (Xeon family 6 model 207), a tenth of a burst's CPU per
    film beside a bf16 forward pass, for a file no reader may open; encoding the grid costs 0.03 ms.
    """
    cam = cam.detach().cpu().numpy() if isinstance(cam, torch.Tensor) else np.asarray(cam)
    buf = io.BytesIO()
    Image.fromarray(np.rint(np.clip(cam, 0.0, 1.0) * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def upsample_cam(values: np.ndarray, size: tuple[int, int], max_side: int = HEATMAP_MAX_SIDE) -> np.ndarray:
    """Upsamples a stored 0..1 map to the heat-map size for a film of `size` (width, height; see heatmap_size),
    bilinearly; a map already as large (heat-maps stored full-size by earlier versions) is returned as it is."""
    width, height = heatmap_size(size, max_side)
    if values.shape[1] >= width or values.shape[0] >= height:
        return values
    # PIL's bilinear resize equals F.interpolate(align_corners=False) here to 1e-6, and starts no OpenMP team.
    up = Image.fromarray(values.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(up), 0.0, 1.0)
