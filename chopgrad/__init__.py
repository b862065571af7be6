"""chopgrad: truncated backpropagation (ChopGrad) through causal-cache video VAE decoders.

The public API::

    decoder = chopgrad.wrap_decoder(vae)          # diffusers AutoencoderKLWan / AutoencoderKLCogVideoX
    loss = chopgrad.decode_loss(decoder, latents, target, loss_fn, d_trunc=1, tiles=(2, 2))
    loss.backward()                                 # truncated gradients into latents and decoder params
    video = chopgrad.decode(decoder, latents)       # == vae.decode(latents).sample

See the paper, section 3 and Algorithm 1 (supplement A).
"""

from chopgrad._compat import ensure_torchvision as _ensure_torchvision

_ensure_torchvision()  # before anything below imports diffusers (which imports torchvision)

from chopgrad.adapters import CogVideoXDecoder, WanDecoder, wrap_decoder
from chopgrad.engine import decode, decode_loss
from chopgrad.protocol import CausalDecoder, Tile, num_frames, num_latent_frames, step_frames

__version__ = "0.1.0"

__all__ = [
    "CausalDecoder",
    "CogVideoXDecoder",
    "Tile",
    "WanDecoder",
    "decode",
    "decode_loss",
    "num_frames",
    "num_latent_frames",
    "step_frames",
    "wrap_decoder",
]
