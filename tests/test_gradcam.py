"""Grad-CAM from forward activations equals hook-based autograd Grad-CAM on a real film."""
import numpy as np
import torch
import torch.nn.functional as F

from core.films.imaging import load_grayscale
from core.ml.gradcam import cam_png, forward_with_cam, normalize_maps, upsample_cam
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


def test_the_stored_map_is_the_cam_grid_and_is_upsampled_to_the_film_size_when_shown():
    import io

    from PIL import Image
    cam = np.zeros((7, 7), dtype=np.float32)
    cam[3, 3] = 1.0
    cam[0, 6] = 0.5
    img = Image.open(io.BytesIO(cam_png(cam)))
    stored = np.asarray(img)
    assert img.size == (7, 7) and img.mode == "L"
    assert (stored[3, 3], stored[0, 6], stored[0, 0]) == (255, 128, 0)
    shown = upsample_cam(stored.astype(np.float32) / 255, (300, 200))
    assert shown.shape == (200, 300)
    # Bilinear from pixel centres: the grid cell's centre keeps its value, a corner cell its own.
    assert shown[100, 150] > 0.95 and shown[199, 0] == 0.0 and abs(shown[0, 299] - 128 / 255) < 1e-6
    assert float(shown.max()) <= 1.0 and float(shown.min()) >= 0.0


def test_a_large_films_heatmap_is_shown_at_a_bounded_size_with_its_aspect_ratio():
    # A 2,000×3,000 px DICOM film: the heat-map keeps the film's shape at 512 px on its longer side, and its
    # peak sits at the same relative place, so the page's overlay (stretched to the film) lines up.
    cam = np.zeros((7, 7), dtype=np.float32)
    cam[1, 5] = 1.0
    arr = upsample_cam(cam, (2000, 3000))
    assert arr.shape == (512, 341)
    row, col = np.unravel_index(int(arr.argmax()), arr.shape)
    assert abs(row / 512 - 1.5 / 7) < 0.02 and abs(col / 341 - 5.5 / 7) < 0.02


def test_a_map_stored_full_size_by_an_earlier_version_is_shown_as_it_is():
    full = np.random.default_rng(0).random((200, 300)).astype(np.float32)
    assert upsample_cam(full, (300, 200)) is full
