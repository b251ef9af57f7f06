"""Grad-CAM saliency and overlays (MONAI's visualize), as PNG bytes.

Classification: Grad-CAM of one label's logit at the last feature layer of the
DenseNet. Segmentation: the predicted mask blended over the image. Images come from
local data and the PNGs stay where they are made (a site's report or PACS export).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from monai.visualize import GradCAM, blend_images

from common.config import Model

# MONAI DenseNet121 layers by downsampling factor, deepest first: Grad-CAM uses the
# deepest whose map is still at least MIN_CAM cells wide (a 1x1 map says nothing).
DENSENET_LAYERS = ((32, "class_layers.relu"), (16, "features.transition3.relu"),
                   (8, "features.transition2.relu"), (4, "features.transition1.relu"))
MIN_CAM = 7


def target_layer(kind: Model, image_size: int) -> str:
    if kind is not Model.DENSENET121:
        raise ValueError(f"Grad-CAM is defined here for classification models, not {kind}")
    for factor, name in DENSENET_LAYERS:
        if image_size // factor >= MIN_CAM:
            return name
    return DENSENET_LAYERS[-1][1]


def gradcam(model: torch.nn.Module, kind: Model, image: np.ndarray, label: int) -> np.ndarray:
    """(H, W) saliency in [0, 1] of output `label` for one (1, H, W) image."""
    cam = GradCAM(nn_module=model, target_layers=target_layer(kind, image.shape[-1]))
    x = torch.from_numpy(np.ascontiguousarray(image[None])).float()
    with torch.enable_grad():
        heat = cam(x, class_idx=label)
    return np.asarray(heat[0, 0].detach().numpy(), dtype=np.float32)


def overlay_png(image: np.ndarray, heat: np.ndarray, title: str, *, mask: bool = False) -> bytes:
    """`image` (H, W) in [0, 1] with `heat` (H, W) blended on top, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rgb = blend_images(image[None], heat[None], alpha=0.45 if mask else 0.5,
                       cmap="autumn" if mask else "jet", rescale_arrays=not mask)
    fig, ax = plt.subplots(figsize=(3.2, 3.4))
    ax.imshow(np.moveaxis(np.asarray(rgb), 0, -1))
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
