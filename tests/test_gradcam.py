"""Grad-CAM from forward activations equals hook-based autograd Grad-CAM on a real film."""
import numpy as np
import torch
import torch.nn.functional as F

from core.films.imaging import load_grayscale
from core.ml.gradcam import forward_with_cam, heatmap_png, normalize_maps
from core.ml.network import build_network
from core.ml.preprocess import preprocess
from tests.conftest import fixture_images


def autograd_gradcam(net, x):
    """Classic Grad-CAM: hooks on features.norm5, backward from the logit."""
    store = {}
    layer = net.features.norm5

    def forward_hook(module, inputs, output):
        store["a"] = output
        output.register_hook(lambda grad: store.__setitem__("g", grad))
        return output.clone()  # DenseNet applies ReLU in place right after norm5

    handle = layer.register_forward_hook(forward_hook)
    try:
        logits = net(x).squeeze(1)
        logits.sum().backward()
    finally:
        handle.remove()
    a, g = store["a"].detach(), store["g"].detach()
    weights = g.mean(dim=(2, 3), keepdim=True)
    return logits.detach(), normalize_maps(F.relu((weights * a).sum(1)))


def test_forward_cam_equals_autograd_gradcam_on_real_image():
    torch.manual_seed(0)
    net = build_network("none").eval()
    with torch.no_grad():  # random heads often give an all-negative map; positive weights give a real one
        net.classifier.weight.abs_()
    images = [load_grayscale(p) for p in fixture_images()[:2]]
    x = preprocess(images)
    ref_logits, ref_maps = autograd_gradcam(net, x.clone().requires_grad_(True))
    with torch.no_grad():
        logits, maps = forward_with_cam(net, x)
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    assert maps.shape == (2, 7, 7)
    assert float((maps - ref_maps).abs().max()) < 1e-4
    assert float(maps.amax()) > 0.99 and float(maps.amin()) >= 0.0


def test_heatmap_png_is_upsampled_to_image_size():
    import io

    from PIL import Image
    cam = np.zeros((7, 7), dtype=np.float32)
    cam[3, 3] = 1.0
    img = Image.open(io.BytesIO(heatmap_png(cam, (300, 200))))
    arr = np.asarray(img)
    assert img.size == (300, 200) and img.mode == "L"
    assert arr[100, 150] > 200 and arr[0, 0] == 0


def test_a_large_films_heatmap_is_stored_at_a_bounded_size_with_its_aspect_ratio():
    # A 2,000×3,000 px DICOM film: the heat-map keeps the film's shape at 512 px on its longer side, and its
    # peak sits at the same relative place, so the page's overlay (stretched to the film) lines up.
    import io

    from PIL import Image
    cam = np.zeros((7, 7), dtype=np.float32)
    cam[1, 5] = 1.0
    img = Image.open(io.BytesIO(heatmap_png(cam, (2000, 3000))))
    assert img.size == (341, 512)
    arr = np.asarray(img)
    row, col = np.unravel_index(int(arr.argmax()), arr.shape)
    assert abs(row / 512 - 1.5 / 7) < 0.02 and abs(col / 341 - 5.5 / 7) < 0.02
