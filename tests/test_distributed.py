"""chopgrad.distributed: a 2-process FSDP2 run (torchrun, gloo, CPU) follows the single-process run.

The problem is the train stage's in miniature: a tiny ``WanTransformer3DModel`` predicts the
velocity ``v`` from a degraded latent ``z_hat``; the loss is latent MSE on ``v`` plus a pixel
MSE through ``chopgrad.decode_loss`` on a tiny ``AutoencoderKLWan`` decoder. Data parallel: at
step ``s`` rank ``r`` trains on clip ``2 s + r``; the single-process reference sees both clips and
averages their losses. Run as a script (under torchrun) this file is the worker.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import chopgrad
from chopgrad import distributed, lora

# One xdist worker takes the module: the torchrun fixture (about 20 s) runs once.
pytestmark = [pytest.mark.xdist_group("distributed"), pytest.mark.slow]  # 2-process torchrun runs
STEPS = 3
WORLD = 2


def _transformer():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    )
    return model.double()


def _vae():
    from conftest import make_wan

    return make_wan()  # float64, frozen, output kept inside Wan's clamp


def _clips(vae):
    """``STEPS * WORLD`` clips: (z_hat, text, velocity target, pixel target)."""
    generator = torch.Generator().manual_seed(1)
    clips = []
    for _ in range(STEPS * WORLD):
        z = torch.randn(1, 16, 2, 4, 4, generator=generator, dtype=torch.float64)
        z_hat = z + 0.3 * torch.randn(z.shape, generator=generator, dtype=torch.float64)
        text = torch.randn(1, 5, 32, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            target = chopgrad.decode(vae, z)
        clips.append((z_hat, text, z_hat - z, target))
    return clips


def _clip_loss(model, decoder, clip, tiles=(1, 1), tile_group=None):
    z_hat, text, velocity, target = clip
    dtype = model.proj_out.weight.dtype  # bfloat16 in mode "lora_bf16"
    v = model(hidden_states=z_hat.to(dtype), timestep=torch.tensor([200]), encoder_hidden_states=text.to(dtype),
              return_dict=False)[0].to(z_hat.dtype)
    pixel = chopgrad.decode_loss(decoder, z_hat - v, target, lambda a, b: ((a - b) ** 2).mean(), d_trunc=1,
                                 tiles=tiles, halo=1, tile_group=tile_group)
    return ((v - velocity) ** 2).mean() + 10 * pixel


def _setup(mode: str, sharded: bool):
    """``full``: fine-tune the whole transformer. ``lora``: transformer LoRA (FSDP-sharded, with
    activation checkpointing) and a decoder LoRA (unsharded, gradients all-reduced), as in
    Mirage's harmonization stage. ``switch``: as ``lora``, but the transformer LoRA is frozen when
    the model is sharded and starts training at step ``SWITCH`` with a fresh optimizer, as at the
    switch of the train stage's Mirage schedule (requires_grad changed after ``fully_shard``).
    ``lora_bf16``: as ``lora`` on a bf16 base (``train.transformer_dtype: bfloat16``), whose float32
    adapters make each FSDP unit hold two dtypes."""
    model, vae = _transformer(), _vae()
    if mode == "lora_bf16":
        model = model.to(torch.bfloat16)
    if mode != "full":
        lora.add_transformer_lora(model, rank=4, alpha=4)
        lora.add_decoder_lora(vae, rank=2, alpha=2, adapter_name="harmonization")
    if mode == "switch":
        lora.set_adapters(model, active=["transformer"], trainable=[])
    if sharded:
        if mode != "full":  # as on GPU: activation checkpointing of the blocks, then sharding
            model.enable_gradient_checkpointing()
        distributed.shard_transformer(model)
    return model, vae, _optimizer(model, vae)


SWITCH = 1  # the step at which mode "switch" starts training the transformer LoRA
MODES = ("full", "lora", "switch", "lora_bf16")


def _optimizer(model, vae):
    params = list(lora.trainable_parameters(model).values()) + list(lora.trainable_parameters(vae).values())
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))


def _switch(mode: str, step: int, model, vae, optimizer):
    """The optimizer for ``step``: a fresh one over the transformer LoRA too at the switch."""
    if mode == "switch" and step == SWITCH:
        lora.set_adapters(model, active=["transformer"], trainable=["transformer"])
        return _optimizer(model, vae)
    return optimizer


def _step(model, vae, optimizer, clips, rank: int | None) -> float:
    """One optimizer step; ``rank=None`` is the single process that sees the whole global batch."""
    if rank is None:
        loss = sum(_clip_loss(model, vae, clip) for clip in clips) / len(clips)
        logged = float(loss.detach())
    else:
        loss = _clip_loss(model, vae, clips[rank])
        logged = None
    loss.backward()
    if rank is not None:
        distributed.all_reduce_gradients(lora.trainable_parameters(vae).values())
        logged = distributed.all_reduce_mean(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return logged


def _trainable_state(model, vae) -> dict[str, torch.Tensor]:
    state = {f"transformer.{k}": v for k, v in distributed.full_model_state_dict(model, trainable_only=True).items()}
    state.update({f"vae.{k}": v.detach().clone() for k, v in lora.trainable_parameters(vae).items()})
    return state


@functools.cache
def _reference(mode: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    model, vae, optimizer = _setup(mode, sharded=False)
    clips = _clips(vae)
    losses = []
    for step in range(STEPS):
        optimizer = _switch(mode, step, model, vae, optimizer)
        losses.append(_step(model, vae, optimizer, clips[WORLD * step : WORLD * (step + 1)], None))
    return losses, _trainable_state(model, vae)


# Sequence parallelism (issue 17.1-2): both ranks hold the same clip (batch 1), the transformer splits
# its 8 tokens across them, and each rank decodes one of the 2 tiles of the pixel loss.
SP_TILES = (2, 1)


def _sequence_parallel_setup(layout=None):
    """The whole transformer and a decoder LoRA train; with ``layout``: sequence parallel, then sharded."""
    model, vae = _transformer(), _vae()
    lora.add_decoder_lora(vae, rank=2, alpha=2, adapter_name="harmonization")
    if layout is not None:
        distributed.enable_sequence_parallel(model, layout)
        distributed.shard_transformer(model)
    # Plain SGD: the weights then differ by lr times the gradient difference. Wan's FP32LayerNorm sums its
    # parameter gradients over tokens in float32, in another grouping when the tokens are split (relative
    # differences of 1e-8), which AdamW's normalisation would blow up for gradients near zero.
    params = list(lora.trainable_parameters(model).values()) + list(lora.trainable_parameters(vae).values())
    return model, vae, torch.optim.SGD(params, lr=1e-2)


def _sequence_parallel_step(model, vae, optimizer, clip, layout=None) -> float:
    loss = _clip_loss(model, vae, clip, SP_TILES, None if layout is None else layout.sequence_group)
    loss.backward()
    distributed.all_reduce_gradients(lora.trainable_parameters(vae).values())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return distributed.all_reduce_mean(loss)


@functools.cache
def _sequence_parallel_reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    model, vae, optimizer = _sequence_parallel_setup()
    clips = _clips(vae)
    losses = [_sequence_parallel_step(model, vae, optimizer, clips[step]) for step in range(STEPS)]
    return losses, _trainable_state(model, vae)


# ----------------------------------------------------------------------------- the worker


def _worker(out_dir: str) -> None:
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # diffusers returns a view; no in-place use here
    info = distributed.init()
    assert info.world_size == WORLD and info.backend == "gloo"
    report: dict = {"rank": info.rank}
    for mode in MODES:
        model, vae, optimizer = _setup(mode, sharded=True)
        clips = _clips(vae)
        calls = []
        model.blocks[0].register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        losses = []
        for step in range(STEPS):
            if mode == "full" and step == STEPS - 1:
                # Checkpoint before the last step, resume into a fresh sharded model: same last step.
                model_state = distributed.full_model_state_dict(model)
                optim_state = distributed.full_optimizer_state_dict(model, optimizer)
            optimizer = _switch(mode, step, model, vae, optimizer)
            losses.append(_step(model, vae, optimizer, clips[WORLD * step : WORLD * (step + 1)], info.rank))
        report[mode] = losses
        report[f"{mode}_block_forwards_per_step"] = len(calls) / STEPS
        sharded = [p for p in model.parameters() if p.requires_grad]
        moments = [optimizer.state[p]["exp_avg"] for p in sharded]
        report[f"{mode}_local_state_fraction"] = sum(m.to_local().numel() for m in moments) / sum(m.numel() for m in moments)
        report[f"{mode}_is_sharded"] = distributed.is_sharded(model) and all(type(p).__name__ == "DTensor" for p in sharded)
        report[f"{mode}_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
        report[f"{mode}_trainable_dtypes"] = sorted({str(p.dtype) for p in sharded})
        state = _trainable_state(model, vae)
        if mode == "lora":  # peft adapter file written from the gathered (unsharded) weights
            gathered = distributed.full_model_state_dict(model, trainable_only=True)
            if info.is_main:
                lora.save_adapter(model, Path(out_dir) / "transformer_lora.safetensors", "transformer", gathered)
        if mode == "full":
            resumed, _, resumed_optimizer = _setup(mode, sharded=True)
            distributed.load_full_model_state_dict(resumed, model_state if info.is_main else {})
            distributed.load_full_optimizer_state_dict(resumed, resumed_optimizer, optim_state)
            report["resumed_last_loss"] = _step(resumed, vae, resumed_optimizer, clips[-WORLD:], info.rank)
            resumed_state = distributed.full_model_state_dict(resumed, trainable_only=True)
            if info.is_main:
                torch.save(resumed_state, Path(out_dir) / "resumed.pt")
        if info.is_main:
            torch.save(state, Path(out_dir) / f"{mode}.pt")
    layout = distributed.make_layout(WORLD)
    report["layout"] = [layout.data_parallel, layout.sequence_parallel, layout.data_rank, layout.sequence_rank]
    model, vae, optimizer = _sequence_parallel_setup(layout)
    clips = _clips(vae)
    report["sequence_parallel"] = [_sequence_parallel_step(model, vae, optimizer, clips[step], layout)
                                   for step in range(STEPS)]
    state = _trainable_state(model, vae)
    if info.is_main:
        torch.save(state, Path(out_dir) / "sequence_parallel.pt")
    value, grads, decoded = _tiles_across_ranks(torch.distributed.group.WORLD)
    torch.save({"value": value, "grads": grads, "decoded": decoded}, Path(out_dir) / f"tiles_rank{info.rank}.pt")
    (Path(out_dir) / f"rank{info.rank}.json").write_text(json.dumps(report))
    distributed.shutdown()


def _tiles_across_ranks(group=None) -> tuple[float, list[torch.Tensor], list]:
    """One sample's tiled decode_loss (3x2 uneven tiles of a 5x7 latent, a trainable decoder layer):
    its value, the gradients of the latents and the trainable decoder parameters, the tiles decoded here."""
    vae = _vae()
    decoder, decoded = chopgrad.wrap_decoder(vae), []
    init_cache = decoder.init_cache
    decoder.init_cache = lambda tile=None: decoded.append((tile.rows.start, tile.cols.start)) or init_cache(tile=tile)
    trained = list(vae.decoder.conv_out.parameters())
    for param in trained:
        param.requires_grad_(True)
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 16, 3, 5, 7, generator=generator, dtype=torch.float64).requires_grad_(True)
    frames = chopgrad.num_frames(decoder, 3)
    target = torch.rand(1, 3, frames, 40, 56, generator=generator, dtype=torch.float64) * 2 - 1
    loss = chopgrad.decode_loss(decoder, latents, target, torch.nn.functional.mse_loss, d_trunc=1, tiles=(3, 2),
                                halo=1, tile_group=group)
    loss.backward()
    return float(loss), [latents.grad, *(param.grad for param in trained)], decoded


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               __file__, str(out)]
    result = subprocess.run(command, env=env, check=False, capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return out, reports


@pytest.mark.parametrize("mode", MODES)
def test_sharded_run_follows_the_single_process_trajectory(torchrun_run, mode):
    out, reports = torchrun_run
    expected_losses, expected_state = _reference(mode)
    for report in reports:  # every rank logs the same global loss
        assert report[mode] == pytest.approx(expected_losses, rel=1e-10)
        assert report[f"{mode}_is_sharded"]
        # Checkpointed blocks run again in backward, once anything in them trains ("switch": from step SWITCH).
        forwards = {"full": 1, "lora": 2, "lora_bf16": 2, "switch": (SWITCH + 2 * (STEPS - SWITCH)) / STEPS}[mode]
        assert report[f"{mode}_block_forwards_per_step"] == pytest.approx(forwards)
        # Each rank holds about half of the AdamW moments (dim-0 shards; tiny tensors round unevenly).
        assert 0.3 < report[f"{mode}_local_state_fraction"] < 0.7
        if mode == "lora_bf16":  # FSDP units of bf16 base weights and float32 adapters; only the adapters train
            assert report[f"{mode}_dtypes"] == ["torch.bfloat16", "torch.float32"]
            assert report[f"{mode}_trainable_dtypes"] == ["torch.float32"]
    assert expected_losses[-1] < expected_losses[0]  # it does train
    state = torch.load(out / f"{mode}.pt")
    assert set(state) == set(expected_state)
    for name, value in expected_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-9, atol=1e-12, msg=name)


def test_adapter_saved_from_the_sharded_model_loads_into_an_unsharded_one(torchrun_run):
    out, _ = torchrun_run
    _, expected_state = _reference("lora")
    fresh = _transformer()
    lora.load_adapter(fresh, out / "transformer_lora.safetensors")
    loaded = lora.trainable_parameters(fresh)
    assert loaded and {f"transformer.{n}" for n in loaded} == {k for k in expected_state if k.startswith("transformer.")}
    for name, param in loaded.items():
        torch.testing.assert_close(param.detach(), expected_state[f"transformer.{name}"], rtol=1e-9, atol=1e-12)


def test_resume_from_a_gathered_checkpoint_repeats_the_last_step(torchrun_run):
    out, reports = torchrun_run
    assert reports[0]["resumed_last_loss"] == pytest.approx(reports[0]["full"][-1], rel=1e-12)
    resumed, final = torch.load(out / "resumed.pt"), torch.load(out / "full.pt")
    for name, value in resumed.items():
        torch.testing.assert_close(value, final[f"transformer.{name}"], rtol=0, atol=0, msg=name)


def test_tiles_across_ranks_equal_the_single_process_tiled_gradient(torchrun_run):
    """Issue 17.2: each of 2 ranks decodes 3 of the 6 tiles; every rank gets the whole loss and gradient."""
    out, _ = torchrun_run
    value, grads, decoded = _tiles_across_ranks()
    assert len(decoded) == 6
    for rank in range(WORLD):
        got = torch.load(out / f"tiles_rank{rank}.pt")
        assert got["decoded"] == decoded[rank::WORLD]  # its own three tiles, no other
        assert got["value"] == pytest.approx(value, rel=1e-12)
        for mine, theirs in zip(got["grads"], grads, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12)


def test_a_step_split_across_two_ranks_equals_the_single_process_step(torchrun_run):
    """Issue 17.1: one clip per step shared by 2 ranks (sequence parallel, FSDP, tiles across ranks)
    gives the single-process losses and weights, transformer and decoder LoRA alike."""
    out, reports = torchrun_run
    expected_losses, expected_state = _sequence_parallel_reference()
    assert [report["layout"] for report in reports] == [[1, 2, 0, 0], [1, 2, 0, 1]]
    for report in reports:
        assert report["sequence_parallel"] == pytest.approx(expected_losses, rel=1e-9)
    assert expected_losses[-1] < expected_losses[0]
    state = torch.load(out / "sequence_parallel.pt")
    assert set(state) == set(expected_state) and any(k.startswith("vae.") for k in state)
    for name, value in expected_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-9, atol=1e-11, msg=name)


def test_sequence_parallel_is_refused_where_it_cannot_split(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.make_layout(1) == distributed.Layout(1, 1, 0, 0)
    with pytest.raises(ValueError, match="sequence_parallel 2 must be >= 1 and divide the number of processes"):
        distributed.make_layout(2)
    three_heads = distributed.Layout(1, 3, 0, 0)
    with pytest.raises(ValueError, match="must divide the transformer's 2 attention heads"):
        distributed.enable_sequence_parallel(_transformer(), three_heads)
    with pytest.raises(ValueError, match="has no context parallelism"):
        distributed.enable_sequence_parallel(torch.nn.Linear(2, 2), three_heads)


def test_tile_group_without_a_process_group_is_refused():
    vae = _vae()
    latents = torch.zeros(1, 16, 1, 2, 2, dtype=torch.float64)
    target = torch.zeros(1, 3, 1, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        chopgrad.decode_loss(vae, latents, target, torch.nn.functional.mse_loss, tiles=(2, 2), tile_group=object())


def test_init_without_torchrun_is_a_single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = distributed.init(device="cpu")
    assert (info.rank, info.world_size, info.backend, info.is_main, info.distributed) == (0, 1, None, True, False)
    model = _transformer()
    assert distributed.shard_transformer(model) is model and not distributed.is_sharded(model)
    assert distributed.all_reduce_mean(torch.tensor(2.5)) == 2.5
    assert set(distributed.full_model_state_dict(model)) == set(model.state_dict())


def test_a_bare_cuda_device_gets_the_local_rank_as_index(monkeypatch):
    # train.device: cuda reaches init as "cuda"; torch.cuda.set_device refuses a device without an index.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(torch.device(device)))
    assert distributed.init(device="cuda").device == torch.device("cuda", 0) and chosen == [torch.device("cuda", 0)]
    assert distributed._resolve_device("cuda", 3) == torch.device("cuda", 3)
    assert distributed._resolve_device("cuda:1", 3) == torch.device("cuda", 1)
    assert distributed._resolve_device("cpu", 3) == torch.device("cpu")


def test_bad_environment_and_models_are_rejected(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ValueError, match="incomplete.*WORLD_SIZE"):
        distributed.init()
    monkeypatch.setenv("WORLD_SIZE", "two")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="must be integers"):
        distributed.init()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="nccl backend needs CUDA"):
        distributed.init("nccl", device="cpu")
    with pytest.raises(ValueError, match="no module list 'layers'"):
        distributed.shard_transformer(_transformer(), block_attribute="layers")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _worker(sys.argv[1])
