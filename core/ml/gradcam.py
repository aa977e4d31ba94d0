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


# The stored heat-map's longer side. A Grad-CAM map is 7×7, so a film-sized PNG holds no more detail than this,
# and at a DICOM film's 2,000–3,000 px it cost more CPU than the network's forward pass (about 220 ms a film on a
# 2-core server) and megabytes per page view. The study page stretches it over the film (same aspect ratio).
HEATMAP_MAX_SIDE = 512


def heatmap_size(size: tuple[int, int], max_side: int = HEATMAP_MAX_SIDE) -> tuple[int, int]:
    """The (width, height) a heat-map is stored at for a film of `size`: the film's own size, scaled down (never
    up) so that its longer side is at most `max_side`, keeping the aspect ratio."""
    width, height = size
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def heatmap_png(cam: np.ndarray | torch.Tensor, size: tuple[int, int], max_side: int = HEATMAP_MAX_SIDE) -> bytes:
    """Upsamples a 0..1 CAM to the heat-map size for a film of `size` (width, height; see heatmap_size) and
    encodes it as an 8-bit grayscale PNG."""
    width, height = heatmap_size(size, max_side)
    # PIL, not torch: this runs in the pipeline's stage threads beside the network's forward pass, and a torch op
    # there starts a second OpenMP team on the same cores, and the two teams slow each other down. PIL's
    # bilinear resize equals F.interpolate(align_corners=False) here to 1e-6.
    cam = cam.detach().cpu().numpy() if isinstance(cam, torch.Tensor) else np.asarray(cam)
    up = Image.fromarray(cam.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
    arr = np.rint(np.clip(np.asarray(up), 0.0, 1.0) * 255).astype(np.uint8)
    buf = io.BytesIO()
    # zlib level 1, not the default 6: this runs beside the network in a burst, and level 6 took about 2.4x the
    # CPU (300x256 map 6.6 vs 2.8 ms; 410x512 21 vs 8.7 ms, 2-core EPYC) for files about two thirds the size.
    Image.fromarray(arr, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
