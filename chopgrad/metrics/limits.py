"""The smallest inputs each metric and pixel loss takes: one table, read by the metrics, the losses and the stages.

A network pools a frame smaller than its limit to nothing before its last layer and fails deep inside
its library with a shape error; callers check these numbers first and say what is too small. The
sizes were measured on the networks (a frame one pixel smaller fails, this size runs).
"""

from __future__ import annotations

__all__ = ["FVD_MIN_FRAMES", "MIN_SIZE"]

# Smallest frame side in pixels, by metric or pixel-loss name (chopgrad.metrics.METRICS,
# chopgrad.losses.KNOWN_LOSSES); a name not listed takes any size.
MIN_SIZE = {
    "mse": 1,
    "ssim": 11,  # its 11x11 Gaussian window
    "gram": 8,  # VGG16's three 2x2 pools before relu4_3
    "lpips_vgg": 16,  # VGG16's four 2x2 pools before relu5_3
    "dists": 16,  # the same VGG16 trunk
    "lpips_alex": 31,  # AlexNet's stride-4 conv and two 3x3/2 max-pools before relu5
    "dynamic_degree": 128,  # torchvision RAFT: its 1/8-scale feature maps need 16 px for the correlation pyramid
}

FVD_MIN_FRAMES = 9  # I3D's last temporal pooling needs ceil(T / 8) >= 2
