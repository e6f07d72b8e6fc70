"""The toy world's recipe and shapes: :class:`WorldConfig` (every stage's steps, batch sizes and learning rates,
what ``editbench world train --set`` overrides) and the configs of the models it trains (VAE, UNet, text encoder,
noise schedule, evaluator). The stages that train them are in :mod:`editbench.toyworld.train`.
"""

from __future__ import annotations

from dataclasses import dataclass

from editbench.models import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE

__all__ = ["EVALUATOR_CONFIG", "EVALUATOR_NAME", "WorldConfig", "scheduler_kwargs", "text_config", "unet_config",
           "vae_config"]


@dataclass
class WorldConfig:
    seed: int = 0
    image_size: int = 32
    n_scenes: int = 30000
    pattern_prob: float = 0.6  # share of base-training objects with a second-color pattern (eight patterns)
    # where a single object goes when its caption states no position ("center", as in photos; "": anywhere, which
    # gives a position-free prompt nine answers and the model draws two copies at once: docs/toyworld.md)
    unsaid_position: str = "center"
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_object_weight: float = 5.0    # reconstruction-loss weight of pixels on/next to an object (background: 1)
    unet_steps: int = 3400
    unet_batch: int = 64
    unet_lr: float = 6e-4
    text_lr: float = 3e-4
    warmup: int = 150
    # UNet lr: warm-up, constant, then a linear decay over the last unet_decay_fraction of the steps to
    # unet_final_lr (a fraction of the peak). A cosine to 5% left the last ~700 of 4,200 steps at <= 11% lr with a
    # flat loss and category accuracy 0.625; 600 more steps at the peak lr raised it to 0.800 (docs/toyworld.md).
    unet_decay_fraction: float = 0.15
    unet_final_lr: float = 0.2
    ema_decay: float = 0.995
    cond_dropout: float = 0.1
    object_loss_weight: float = 5.0   # diffusion-loss weight of latent pixels on/next to an object (background: 1)
    # patterns stage: the UNet + text encoder continued from the EMA weights on pattern-rich scenes
    # (docs/toyworld.md: 900 such steps raised the describability gate's score from 0.24 to 0.47)
    pattern_steps: int = 1400
    pattern_scenes: int = 12000
    pattern_stage_prob: float = 0.9
    pattern_lr: float = 6e-4          # text encoder: half of it; 50 warm-up steps, then constant
    evaluator_steps: int = 700
    evaluator_batch: int = 128
    evaluator_lr: float = 1e-3
    decoder_steps: int = 800
    decoder_lr: float = 5e-4
    checkpoint_every: int = 200
    text_width: int = 64
    # Attention heads of every UNet attention layer: diffusers' ``attention_head_dim`` argument is the number of
    # heads (its naming quirk). 4 heads of 24 and 32 channels: a training step costs 0.69x the 32 heads' of 3-4
    # channels and learns more per step (docs/toyworld.md).
    unet_heads: int = 4

    def replace(self, **overrides) -> "WorldConfig":
        """A copy with ``overrides`` (``editbench world train --set key=value``): unknown fields and values of the
        wrong type are an EditbenchError naming them (an int field takes ints only, a float field ints or
        floats)."""
        from dataclasses import fields, replace

        from editbench.errors import EditbenchError

        known = {f.name: f for f in fields(self)}
        for key, value in overrides.items():
            if key not in known:
                raise EditbenchError(f"unknown world config field {key!r}; valid: {sorted(known)}")
            want = type(getattr(self, key))
            ok = isinstance(value, want) and not (want is int and isinstance(value, bool)) or \
                (want is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                raise EditbenchError(f"world config field {key!r} takes values of type {want.__name__}, got {value!r}")
        return replace(self, **{k: float(v) if type(getattr(self, k)) is float else v for k, v in overrides.items()})

    @classmethod
    def smoke(cls, seed: int = 0) -> "WorldConfig":
        """Every stage for a few steps on a few scenes (seconds): for tests and CI, not for use."""
        return cls(seed=seed, n_scenes=64, vae_steps=4, vae_batch=8, unet_steps=4, unet_batch=8, warmup=2,
                   evaluator_steps=2, evaluator_batch=16, decoder_steps=2, checkpoint_every=2, pattern_steps=2,
                   pattern_scenes=16)


# ------------------------------------------------------------------------------------------ model configs
def vae_config(cfg: WorldConfig) -> dict:
    # Two levels: a 2x downsampling, 32x32x3 pixels <-> 16x16x4 latents.
    return dict(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                latent_channels=4, layers_per_block=1, norm_num_groups=16, sample_size=cfg.image_size)


def unet_config(cfg: WorldConfig) -> dict:
    # SD's block types; cross-attention at 8x8 and 4x4 latents only (self-attention at 16x16 dominates CPU
    # cost and the grammar's positions are a 3x3 grid).
    return dict(sample_size=cfg.image_size // 2, in_channels=4, out_channels=4,
                block_out_channels=(48, 96, 128),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                layers_per_block=1, cross_attention_dim=cfg.text_width, attention_head_dim=cfg.unet_heads,
                norm_num_groups=16)


def text_config(cfg: WorldConfig) -> dict:
    return dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
                num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=cfg.text_width)


def scheduler_kwargs() -> dict:
    return dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1)


EVALUATOR_NAME = "editbench-toyclip"
EVALUATOR_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": 77, "vocab_size": CLIP_VOCAB_SIZE, "width": 64, "heads": 4, "layers": 3},
}
