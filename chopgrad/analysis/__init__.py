"""Measure what ChopGrad relies on, on any causal decoder (paper section 3.3, figures 3 to 7).

Library functions (tensors in, results out; the CLI ``python -m chopgrad.analysis`` and the
pipeline stage ``analysis`` are thin layers over them):

=====================================  ====================================================  ======
function                               what                                                  figure
=====================================  ====================================================  ======
:func:`temporal_locality`              ``L(i <- j) = ||d x_i / d z_j||_F`` by random probes  3
:func:`fit_exponential`                ``C exp(-alpha D)`` with R^2 and intervals            3
:func:`recommend_d_trunc`              ``D >= log(C / eps) / alpha`` for a relative tolerance
:func:`decoder_gradient_error`         truncated vs exact latent gradients                   5
:func:`parameter_gradient_agreement`   truncated vs exact backbone parameter gradients       4
:func:`measure_resources`              time and memory vs ``d_trunc`` and video length       6, 13
:func:`spatial_locality`               zero the bottom latents, see how far up pixels move   7
=====================================  ====================================================  ======

Everything works through the decoder protocol (:func:`chopgrad.wrap_decoder`): Wan 2.1/2.2,
CogVideoX and any :class:`chopgrad.CausalDecoder` of your own.
"""

from chopgrad.analysis.fit import ExponentialFit, fit_exponential, recommend_d_trunc
from chopgrad.analysis.gradients import (
    GradientError,
    ParameterAgreement,
    decoder_gradient_error,
    parameter_gradient_agreement,
)
from chopgrad.analysis.locality import Locality, exact_locality, temporal_locality
from chopgrad.analysis.report import json_safe, locality_report
from chopgrad.analysis.resources import measure_resources
from chopgrad.analysis.spatial import SpatialLocality, spatial_locality

__all__ = [
    "ExponentialFit",
    "GradientError",
    "Locality",
    "ParameterAgreement",
    "SpatialLocality",
    "decoder_gradient_error",
    "exact_locality",
    "fit_exponential",
    "json_safe",
    "locality_report",
    "measure_resources",
    "parameter_gradient_agreement",
    "recommend_d_trunc",
    "spatial_locality",
    "temporal_locality",
]
