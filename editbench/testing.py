"""Tiny Stable-Diffusion-architecture models for tests and examples (random weights, no download).

``tiny_unet(geometry)`` builds a ``UNet2DConditionModel`` whose block layout follows SD 1.x, SD 2.x or SDXL
at a fraction of the width; ``tiny_pipeline()`` assembles a complete ``StableDiffusionPipeline`` from tiny
parts with the real CLIP tokenizer, ``tiny_sd2_pipeline()`` one of SD 2.x's shape (OpenCLIP-shaped text encoder,
v-prediction) and ``tiny_sdxl_pipeline()`` a ``StableDiffusionXLPipeline`` (two text encoders, pooled text
embeddings, time ids). ``unet_config(geometry, full=True)`` gives the real-size configs, for
geometry-only measurements (build those on the ``meta`` device); ``random_pipeline(geometry)`` builds a complete
random-weight pipeline of full SD 1.5 or SDXL size (the slow full-geometry tests and ``benchmarks/gpu.py``).
"""

from __future__ import annotations

import torch

from editbench.models import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, clip_tokenizer

_FULL = {
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
        sample_size=64,
    ),
    "sd21": dict(
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        layers_per_block=2,
        sample_size=96,
    ),
    "sdxl": dict(
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        layers_per_block=2,
        sample_size=128,
    ),
}

_TINY = {
    "sd15": dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=8, layers_per_block=1, sample_size=8, norm_num_groups=8),
    "sd21": dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
                 attention_head_dim=(2, 4), use_linear_projection=True, layers_per_block=1, sample_size=8,
                 norm_num_groups=8),
    "sdxl": dict(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                 attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=80, layers_per_block=1, sample_size=8, norm_num_groups=8),
}

GEOMETRIES = tuple(_FULL)


def unet_config(geometry: str = "sd15", *, full: bool = False) -> dict:
    """The ``UNet2DConditionModel`` config of ``geometry`` (``sd15``, ``sd21``, ``sdxl``), tiny or full size."""
    table = _FULL if full else _TINY
    if geometry not in table:
        from editbench.errors import EditbenchError

        raise EditbenchError(f"unknown geometry {geometry!r}; choose one of {sorted(table)}")
    return dict(in_channels=4, out_channels=4, **table[geometry])


def tiny_unet(geometry: str = "sd15", *, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(geometry))


def tiny_text_encoder(hidden_size: int = 32, *, seed: int = 0, hidden_act: str = "quick_gelu",
                      projection_dim: int | None = None, num_hidden_layers: int = 2, pad_token_id: int = 49407):
    """A random ``CLIPTextModel`` of width ``hidden_size`` (``CLIPTextModelWithProjection`` with ``projection_dim``:
    SDXL's second encoder, whose projected end-token output is the pooled text embedding)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=2,
                         max_position_embeddings=CLIP_MAX_LENGTH, hidden_act=hidden_act,
                         projection_dim=projection_dim or hidden_size, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=pad_token_id)
    return CLIPTextModel(cfg) if projection_dim is None else CLIPTextModelWithProjection(cfg)


def tiny_vae(*, seed: int = 0, scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                         layers_per_block=1, sample_size=16, scaling_factor=scaling_factor)


def tiny_pipeline(*, seed: int = 0):
    """A complete, randomly initialised SD-1.x-shaped ``StableDiffusionPipeline`` (16x16 px, 8x8 latents)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed=seed),
        text_encoder=tiny_text_encoder(32, seed=seed),
        tokenizer=clip_tokenizer(),
        unet=tiny_unet("sd15", seed=seed),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                    steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def open_clip_tokenizer():
    """The CLIP tokenizer as SD 2.x and SDXL's second encoder use it: OpenCLIP pads with "!" (id 0), not with the
    end token."""
    tok = clip_tokenizer()
    tok.pad_token = "!"
    return tok


def tiny_sd2_pipeline(*, seed: int = 0):
    """A randomly initialised ``StableDiffusionPipeline`` of SD 2.x's shape (16x16 px, 8x8 latents): an
    OpenCLIP-shaped text encoder (``CLIPTextModel`` with ``gelu``, width 48, padding "!"; like the converted SD 2.x
    checkpoints it ends at OpenCLIP's penultimate layer, so the pipeline reads its ``last_hidden_state``), the SD 2.x
    UNet layout (linear projections, per-block head widths) and a v-prediction DDIM scheduler (SD 2.x 768 px)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed=seed),
        text_encoder=tiny_text_encoder(48, seed=seed, hidden_act="gelu", pad_token_id=0),
        tokenizer=open_clip_tokenizer(),
        unet=tiny_unet("sd21", seed=seed),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                steps_offset=1, prediction_type="v_prediction"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


SDXL_TEXT_WIDTHS = (24, 40)
"""Widths of the tiny SDXL pipeline's two text encoders (CLIP-L and OpenCLIP-bigG: 768 and 1280 in SDXL); their
concatenation is the UNet's cross-attention width (64; 2048 in SDXL)."""


def tiny_sdxl_pipeline(*, seed: int = 0):
    """A randomly initialised ``StableDiffusionXLPipeline`` (16x16 px, 8x8 latents), built offline: a CLIP-L-shaped
    ``CLIPTextModel`` (width 24, quick_gelu) with the CLIP tokenizer, an OpenCLIP-bigG-shaped
    ``CLIPTextModelWithProjection`` (width 40, gelu, pooled projection 32) with the tokenizer padding "!", the SDXL
    UNet layout (``text_time`` added conditioning: pooled embedding + 6 time ids) and SDXL's Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    d1, d2 = SDXL_TEXT_WIDTHS
    unet = tiny_unet("sdxl", seed=seed)
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    assert d1 + d2 == cfg.cross_attention_dim, (d1, d2, cfg.cross_attention_dim)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed=seed, scaling_factor=0.13025),
        text_encoder=tiny_text_encoder(d1, seed=seed),
        text_encoder_2=tiny_text_encoder(d2, seed=seed + 1, hidden_act="gelu", projection_dim=pooled,
                                         pad_token_id=0),
        tokenizer=clip_tokenizer(),
        tokenizer_2=open_clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------- full-size random pipelines
# CLIPTextConfig fields: CLIP ViT-L/14 (SD 1.5, SDXL's first encoder) and OpenCLIP ViT-bigG (SDXL's second)
_RANDOM_TEXT = {
    "clip-l": {"full": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            hidden_act="quick_gelu", projection_dim=768),
               "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            hidden_act="quick_gelu", projection_dim=32)},
    "bigg": {"full": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          hidden_act="gelu", projection_dim=1280, pad_token_id=0),
             "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          hidden_act="gelu", projection_dim=32, pad_token_id=0)},
}
_RANDOM_VAE = {
    "full": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32),
    "tiny": dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4),
}
_VAE_SCALING = {"sd15": 0.18215, "sdxl": 0.13025}


def _random_text_encoder(kind: str, size: str, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    fields = {"pad_token_id": 49407, **_RANDOM_TEXT[kind][size]}
    cfg = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=49406,
                         eos_token_id=49407, **fields)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _random_modules(geometry: str, size: str) -> tuple:
    """UNet, VAE, text encoder(s) of :func:`random_pipeline` (on the current default device and dtype)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(**unet_config(geometry, full=size == "full"))
    down = 2 ** (len(_RANDOM_VAE[size]["block_out_channels"]) - 1)  # pixels per latent
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=_VAE_SCALING[geometry],
                        sample_size=unet.config.sample_size * down, **_RANDOM_VAE[size])
    text = _random_text_encoder("clip-l", size, projection=False)
    text_2 = _random_text_encoder("bigg", size, projection=True) if geometry == "sdxl" else None
    return unet, vae, text, text_2


def random_pipeline(geometry: str = "sd15", device: torch.device | str = "cpu", *, tiny: bool = False,
                    seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``StableDiffusionPipeline`` (sd15) or ``StableDiffusionXLPipeline`` (sdxl) with random weights, every
    module constructed directly on ``device`` (no float32 CPU copy of a 2.6 B-parameter UNet): the UNet of
    :func:`unet_config` (full size unless ``tiny``, the configs of the storage table), CLIP
    ViT-L/14 text encoder(s) (+ OpenCLIP ViT-bigG for SDXL), the SD VAE, the real CLIP tokenizer and a DDIM
    scheduler. ``tiny``: the same architectures at 16x16 px (editbench.testing's tiny configs). ``dtype``: the
    weights' floating dtype, built in it (a half-precision SDXL never exists in float32, not even while built)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    size = "tiny" if tiny else "full"
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet, vae, text, text_2 = _random_modules(geometry, size)
    finally:
        torch.set_default_dtype(default)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    parts = dict(vae=vae.eval(), text_encoder=text.eval(), tokenizer=clip_tokenizer(), unet=unet.eval(),
                 scheduler=scheduler)
    if geometry == "sdxl":
        pipe = StableDiffusionXLPipeline(text_encoder_2=text_2.eval(), tokenizer_2=open_clip_tokenizer(),
                                         add_watermarker=False, **parts)
    else:
        pipe = StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                       **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe
