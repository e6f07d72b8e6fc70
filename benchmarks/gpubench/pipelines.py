"""Random-weight pipelines of full SD 1.5 / SDXL geometry (or tiny: the same architectures at 16x16 px), every
module built directly on the device (no download, no hub).
"""

from __future__ import annotations

import torch


TEXT = {  # CLIPTextConfig fields: CLIP ViT-L/14 (SD 1.5, SDXL's first encoder) and OpenCLIP ViT-bigG (SDXL's second)
    "clip-l": {"full": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            hidden_act="quick_gelu", projection_dim=768),
               "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            hidden_act="quick_gelu", projection_dim=32)},
    "bigg": {"full": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          hidden_act="gelu", projection_dim=1280, pad_token_id=0),
             "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          hidden_act="gelu", projection_dim=32, pad_token_id=0)},
}
VAE = {"full": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32),
       "tiny": dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4)}
VAE_SCALING = {"sd15": 0.18215, "sdxl": 0.13025}


def _text_encoder(kind: str, size: str, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from editbench.models import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE

    fields = {"pad_token_id": 49407, **TEXT[kind][size]}
    cfg = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=49406,
                         eos_token_id=49407, **fields)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def build_pipeline(geometry: str, device: torch.device, *, tiny: bool, seed: int = 0):
    """A ``StableDiffusionPipeline`` (sd15) or ``StableDiffusionXLPipeline`` (sdxl) with random weights, every
    module constructed directly on ``device`` (no float32 CPU copy of a 2.6 B-parameter UNet): the UNet of
    :func:`editbench.testing.unet_config` (full size unless ``tiny``, the configs of the storage table), CLIP
    ViT-L/14 text encoder(s) (+ OpenCLIP ViT-bigG for SDXL), the SD VAE, the real CLIP tokenizer and a DDIM
    scheduler. ``tiny``: the same architectures at 16x16 px (editbench.testing's tiny configs)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, \
        UNet2DConditionModel

    from editbench.models import clip_tokenizer
    from editbench.testing import unet_config

    size = "tiny" if tiny else "full"
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(geometry, full=not tiny))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=VAE_SCALING[geometry],
                            sample_size=unet.config.sample_size * 2 ** (len(VAE[size]["block_out_channels"]) - 1),
                            **VAE[size])
        text = _text_encoder("clip-l", size, projection=False)
        text_2 = _text_encoder("bigg", size, projection=True) if geometry == "sdxl" else None
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    parts = dict(vae=vae.eval(), text_encoder=text.eval(), tokenizer=clip_tokenizer(), unet=unet.eval(),
                 scheduler=scheduler)
    if geometry == "sdxl":
        tok_2 = clip_tokenizer()
        tok_2.pad_token = "!"                                       # OpenCLIP pads with "!" (id 0)
        pipe = StableDiffusionXLPipeline(text_encoder_2=text_2.eval(), tokenizer_2=tok_2, add_watermarker=False,
                                         **parts)
    else:
        pipe = StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                       **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def param_count(module) -> int | None:
    return None if module is None else int(sum(p.numel() for p in module.parameters()))
