"""peft LoRA adapters for the Wan transformer and the Wan VAE decoder (paper supplement B.4, C).

The paper fine-tunes Wan 2.1 with LoRA: rank 128 / alpha 64 on the diffusion transformer and
rank 16 / alpha 16 on the VAE decoder (Mirage, supplement B.4), with two *separate* decoder
LoRAs for Mirage's two training phases (reconstruction, then harmonization). Decoder LoRA
weights are trained through ChopGrad: :class:`chopgrad.WanDecoder` hands every decoder
parameter with ``requires_grad`` (LoRA included) to :func:`chopgrad.decode_loss`.

Everything here is peft (``LoraConfig`` + ``inject_adapter_in_model``,
``get_peft_model_state_dict`` / ``set_peft_model_state_dict``, ``set_adapter``,
``set_requires_grad``). One piece is ours: peft cannot adapt Wan's ``WanCausalConv3d``
(a subclass of ``nn.Conv3d``) by itself, see the note below, so :class:`CausalConv3dLora`, a
subclass of peft's own ``lora.Conv3d``, is registered through peft's custom-module API.

.. note:: **Why Wan's causal convolutions need their own LoRA layer.**
   peft 0.21 dispatches any ``nn.Conv3d`` subclass to ``lora.Conv3d``, which builds its
   ``lora_A`` as ``type(base_layer)(in, r, kernel, stride, padding, bias=False)``:
   ``WanCausalConv3d.__init__`` takes no ``bias`` and fails with ``TypeError``. Even if it
   were built, peft's forward runs ``lora_A(x)`` on the raw input, while the base conv first
   prepends the cached frames of the previous decode step (``cache_x``) and pads causally
   (``WanCausalConv3d`` sets its own ``padding`` to 0): the LoRA branch would see neither
   the cache nor the padding. :class:`CausalConv3dLora` builds ``lora_A`` as a plain
   ``nn.Conv3d`` with the base kernel and stride and feeds it the *same* cached, padded input
   as the base conv, so ``base(x) + B(A(x))`` is the conv with weight ``W + scale * B A`` on
   every decode step (tested against peft's own merge).

Typical use (what ``stages/train.py`` does)::

    add_transformer_lora(transformer, rank=128, alpha=64)             # freezes the base weights
    add_decoder_lora(vae, rank=16, alpha=16, adapter_name="reconstruction")
    # Mirage phase 2: a second decoder LoRA; the first stays active but frozen
    add_decoder_lora(vae, rank=16, alpha=16, adapter_name="harmonization")
    set_adapters(vae, active=["reconstruction", "harmonization"], trainable=["harmonization"])
    params = list(trainable_parameters(transformer).values()) + list(trainable_parameters(vae).values())
    ...
    save_adapter(vae, "decoder_harmonization.safetensors", "harmonization")
    load_adapter(fresh_vae, "decoder_harmonization.safetensors", "harmonization")  # injects if absent
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as lora_layer
from peft.tuners.tuners_utils import BaseTunerLayer, set_adapter, set_requires_grad
from torch import Tensor, nn

__all__ = [
    "TRANSFORMER_TARGETS",
    "CausalConv3dLora",
    "adapter_names",
    "adapter_state_dict",
    "add_decoder_lora",
    "add_transformer_lora",
    "decoder_lora_targets",
    "load_adapter",
    "save_adapter",
    "set_adapters",
    "trainable_parameters",
]

# Suffixes of diffusers' WanTransformer3DModel module names: the self- (attn1) and
# cross-attention (attn2) projections of every block, and its feed-forward network.
TRANSFORMER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")

_METADATA_KEY = "chopgrad_lora_config"


# ----------------------------------------------------------------------------- the causal conv layer


def _causal_input(conv: nn.Conv3d, x: Tensor, cache_x: Tensor | None) -> Tensor:
    """The input ``WanCausalConv3d.forward`` hands to its plain convolution (cache + causal pad)."""
    padding = list(conv._padding)
    if cache_x is not None and conv._padding[4] > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        padding[4] -= cache_x.shape[2]
    return F.pad(x, padding)


class CausalConv3dLora(lora_layer.Conv3d):
    """peft LoRA layer for diffusers' ``WanCausalConv3d`` (see the module note).

    Not built by hand: :func:`add_decoder_lora` registers it for ``WanCausalConv3d`` with peft's
    ``LoraConfig._register_custom_module``, and peft creates, merges, saves and loads it like
    its own ``lora.Conv3d``. ``forward(x, cache_x)`` has the signature of the conv it wraps.
    """

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        if config.use_dora:
            raise ValueError("DoRA is not supported on Wan's causal convolutions: use plain LoRA (use_dora=False)")
        base = self.get_base_layer()
        causal_class = base.__class__
        # peft builds lora_A / lora_B as type(base_layer)(...): make that a plain nn.Conv3d for
        # the call. WanCausalConv3d only adds the `_padding` attribute, so the swap is layout-safe.
        base.__class__ = nn.Conv3d
        try:
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        finally:
            base.__class__ = causal_class

    def get_delta_weight(self, adapter: str) -> Tensor:
        # peft 0.21.2 takes its Conv2d-1x1 shortcut for 1x1x1 Conv3d kernels (Wan's conv_shortcut)
        # and fails (huggingface/peft#3768, fixed upstream by #3777). lora_B is 1x1x1 with
        # groups=1, so delta[o, i, k] = sum_r B[o, r] A[r, i, k] for any kernel.
        weight_a, weight_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return torch.einsum("or,ri...->oi...", weight_b.flatten(1), weight_a) * self.scaling[adapter]

    def forward(self, x: Tensor, cache_x: Tensor | None = None, **kwargs) -> Tensor:
        if kwargs.get("adapter_names") is not None:
            raise ValueError("mixed-adapter batches are not supported on Wan's causal convolutions")
        if self.disable_adapters or self.merged:
            if self.disable_adapters and self.merged:
                self.unmerge()
            return self.base_layer(x, cache_x)
        base = self.get_base_layer()
        padded = _causal_input(base, x, cache_x)
        result = nn.Conv3d.forward(base, padded)  # == base(x, cache_x), computed once for both branches
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            branch = lora_b(lora_a(self.lora_dropout[name](padded.to(lora_a.weight.dtype))))
            result = result + branch.to(result.dtype) * self.scaling[name]
        return result


# ----------------------------------------------------------------------------- injection


def _inject(model: nn.Module, config, adapter_name: str) -> list[str]:
    """peft injection; afterwards every adapter of ``model`` is active and only the new one trains."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}")
    if adapter_name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}: pick another adapter_name")
    with warnings.catch_warnings():
        # peft warns when a model already holds a peft_config: several named adapters are intended here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, model, adapter_name=adapter_name)  # also freezes non-LoRA weights
    # peft makes the adapter in its base layer's dtype; a bf16 base (a frozen 14B) would leave AdamW rounding
    # most updates of the trainable weights away. float32 adapters, as peft's get_peft_model makes them.
    cast_adapter_dtype(model, adapter_name)
    set_adapters(model, active=adapter_names(model), trainable=[adapter_name])
    return _adapted_modules(model, adapter_name)


def _adapted_modules(model: nn.Module, adapter_name: str) -> list[str]:
    # Not peft_config.target_modules: peft rewrites long target lists into minimal suffixes.
    return sorted(
        name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer) and adapter_name in module.lora_A
    )


def add_transformer_lora(
    transformer: nn.Module,
    rank: int = 128,
    alpha: float = 64,
    *,
    adapter_name: str = "transformer",
    target_modules: Sequence[str] = TRANSFORMER_TARGETS,
    dropout: float = 0.0,
) -> list[str]:
    """Inject a peft LoRA adapter into a diffusers ``WanTransformer3DModel`` (in place).

    Freezes every non-LoRA parameter of ``transformer``; the new adapter is active and trainable.

    Args:
        transformer: the backbone (any module whose submodule names end in ``target_modules``).
        rank, alpha: LoRA rank ``r`` and ``lora_alpha`` (update scaled by ``alpha / rank``);
            the paper uses 128 / 64.
        adapter_name: peft adapter name (used again by :func:`save_adapter` / :func:`load_adapter`).
        target_modules: module-name suffixes to adapt; default: the attention projections
            ``to_q, to_k, to_v, to_out.0`` (self and cross attention) and the FFN
            ``ffn.net.0.proj, ffn.net.2`` of every block.
        dropout: LoRA dropout.

    Returns:
        The full names of the adapted modules.

    Raises:
        ValueError: bad rank/alpha, an adapter of that name already present, or a target that
            matches no module (the message lists the Linear modules that exist).
    """
    from peft import LoraConfig

    _check_rank(rank, alpha)
    linear = [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear)]
    for target in target_modules:
        if not any(n == target or n.endswith("." + target) for n in linear):
            raise ValueError(
                f"LoRA target {target!r} matches no Linear module of {type(transformer).__name__}; "
                f"its Linear modules are {_summarise(linear)}"
            )
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))
    return _inject(transformer, config, adapter_name)


def decoder_lora_targets(vae: nn.Module) -> list[str]:
    """Full names (``decoder.…``) of every convolution of an ``AutoencoderKLWan``'s decoder.

    That is the causal 3D convs (``conv_in``, residual ``conv1``/``conv2``/``conv_shortcut``,
    upsamplers' ``time_conv``, ``conv_out``) and the 2D convs (upsamplers' ``resample.1``,
    attention ``to_qkv``/``proj``). The encoder and ``post_quant_conv`` are not adapted.
    """
    names = []
    for name, module in vae.decoder.named_modules():
        parts = name.split(".")
        if "base_layer" in parts or any(part.startswith("lora_") for part in parts):
            continue  # the insides of a layer that already holds an adapter
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, (nn.Conv2d, nn.Conv3d)):
            names.append(f"decoder.{name}")
    return names


def add_decoder_lora(
    vae: nn.Module,
    rank: int = 16,
    alpha: float = 16,
    adapter_name: str = "reconstruction",
    *,
    target_modules: Sequence[str] | None = None,
    dropout: float = 0.0,
) -> list[str]:
    """Inject a peft LoRA adapter into the decoder of a diffusers ``AutoencoderKLWan`` (in place).

    Freezes every non-LoRA parameter of ``vae``. Call it twice with different ``adapter_name``
    for Mirage's two decoder LoRAs; then pick what runs and what trains with
    :func:`set_adapters`. The adapted VAE works unchanged with :func:`chopgrad.wrap_decoder`,
    :func:`chopgrad.decode_loss` (LoRA weights get ChopGrad gradients) and ``vae.decode``.

    Args:
        vae: ``AutoencoderKLWan`` (Wan 2.1 layout).
        rank, alpha: LoRA rank and alpha; the paper (Mirage) uses 16 / 16.
        adapter_name: e.g. ``"reconstruction"`` (Mirage phase 1) or ``"harmonization"`` (phase 2).
        target_modules: full module names; default :func:`decoder_lora_targets` (every decoder conv).
        dropout: LoRA dropout.

    Returns:
        The full names of the adapted modules.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
    from peft import LoraConfig

    _check_rank(rank, alpha)
    if not hasattr(vae, "decoder"):
        raise TypeError(f"add_decoder_lora expects a diffusers AutoencoderKLWan, got {type(vae).__name__}")
    targets = list(target_modules) if target_modules is not None else decoder_lora_targets(vae)
    names = {n for n, _ in vae.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"decoder LoRA targets {missing} are not modules of the VAE: use full names like 'decoder.conv_in'")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    config._register_custom_module({WanCausalConv3d: CausalConv3dLora})
    return _inject(vae, config, adapter_name)


def _check_rank(rank: int, alpha: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")


def _summarise(names: list[str], limit: int = 12) -> str:
    short = sorted({n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in names})
    return ", ".join(short[:limit]) + (" ..." if len(short) > limit else "")


# ----------------------------------------------------------------------------- selecting adapters


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the peft adapters injected into ``model`` (in injection order)."""
    return list(getattr(model, "peft_config", {}) or {})


def set_adapters(model: nn.Module, active: str | Sequence[str], trainable: str | Sequence[str] = ()) -> None:
    """Choose which adapters run in the forward pass and which of them train.

    Active adapters add their updates (summed); ``trainable`` (a subset of ``active``) get
    ``requires_grad=True``, every other LoRA weight ``False``. Base weights are not touched.
    Mirage phase 2: ``set_adapters(vae, ["reconstruction", "harmonization"], ["harmonization"])``.

    Raises:
        ValueError: an unknown adapter name, or a trainable adapter that is not active.
    """
    active = [active] if isinstance(active, str) else list(active)
    trainable = [trainable] if isinstance(trainable, str) else list(trainable)
    known = adapter_names(model)
    unknown = [n for n in active + trainable if n not in known]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}: this model has {known}")
    if not set(trainable) <= set(active):
        raise ValueError(f"trainable adapters {trainable} must also be active (active: {active})")
    set_adapter(model, active)
    set_requires_grad(model, known, False)
    if trainable:
        set_requires_grad(model, trainable, True)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of every parameter of ``model`` with ``requires_grad`` (for the optimizer)."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


# ----------------------------------------------------------------------------- saving / loading


def adapter_state_dict(
    model: nn.Module, adapter_name: str, state_dict: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """peft's ``get_peft_model_state_dict``: this adapter's weights only, keys without the adapter name.

    Args:
        state_dict: take the tensors from this full state dict instead of ``model.state_dict()``;
            pass ``chopgrad.distributed.full_model_state_dict(model)`` for an FSDP-sharded model
            (whose own state dict holds shards).
    """
    from peft import get_peft_model_state_dict

    _require_adapter(model, adapter_name)
    return get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter_name)


def save_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str, state_dict: dict[str, Tensor] | None = None
) -> Path:
    """Write one adapter's weights to a safetensors file, atomically (temp file, then rename).

    The LoRA config (rank, alpha, adapted modules) goes in the file's metadata, so
    :func:`load_adapter` can inject the adapter into a model that does not have it yet.
    With FSDP: ``state = distributed.full_model_state_dict(model, trainable_only=True)`` on every
    rank, then ``save_adapter(model, path, name, state_dict=state)`` on rank 0 only.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {
        k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model, adapter_name, state_dict).items()
    }
    if not tensors:
        raise ValueError(f"adapter {adapter_name!r} has no weights in the given state dict (was it gathered on rank 0?)")
    config = model.peft_config[adapter_name]
    metadata = {
        _METADATA_KEY: json.dumps(
            {
                "adapter_name": adapter_name,
                "r": config.r,
                "lora_alpha": config.lora_alpha,
                "lora_dropout": config.lora_dropout,
                "target_modules": _adapted_modules(model, adapter_name),
            }
        )
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temp, metadata=metadata)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return path


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> str:
    """Load an adapter written by :func:`save_adapter` into ``model`` (peft's ``set_peft_model_state_dict``).

    If ``model`` has no adapter of that name yet, it is injected first from the config stored in
    the file (with the causal-conv layer for a Wan VAE). Returns the adapter name. The loaded
    adapter keeps the active/trainable state that injection gives (active and trainable); call
    :func:`set_adapters` afterwards to choose.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a chopgrad adapter file, or its tensors do not match the
            model's adapter (missing / unexpected keys or shapes), naming the first mismatches.
    """
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}: write it with chopgrad.lora.save_adapter")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if _METADATA_KEY not in metadata:
        raise ValueError(f"{path} has no {_METADATA_KEY!r} metadata: it was not written by chopgrad.lora.save_adapter")
    stored = json.loads(metadata[_METADATA_KEY])
    adapter_name = adapter_name or stored["adapter_name"]
    if adapter_name not in adapter_names(model):
        config = {"r": stored["r"], "lora_alpha": stored["lora_alpha"], "lora_dropout": stored["lora_dropout"]}
        if _is_wan_vae(model):
            add_decoder_lora(model, config["r"], config["lora_alpha"], adapter_name,
                             target_modules=stored["target_modules"], dropout=config["lora_dropout"])
        else:
            _inject(model, LoraConfig(target_modules=stored["target_modules"], **config), adapter_name)
    tensors = load_file(str(path))
    expected = adapter_state_dict(model, adapter_name)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"adapter file {path} does not fit adapter {adapter_name!r} of this model: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]} "
            "(was it saved from a model with the same architecture and LoRA targets?)"
        )
    device = next(iter(expected.values())).device
    set_peft_model_state_dict(model, {k: v.to(device) for k, v in tensors.items()}, adapter_name=adapter_name)
    return adapter_name


def _require_adapter(model: nn.Module, adapter_name: str) -> None:
    known = adapter_names(model)
    if adapter_name not in known:
        raise ValueError(f"the model has no adapter named {adapter_name!r} (it has {known})")


def _is_wan_vae(model: nn.Module) -> bool:
    from diffusers import AutoencoderKLWan

    return isinstance(model, AutoencoderKLWan)
