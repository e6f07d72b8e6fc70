"""The one training loop every personalization method shares: its API (:mod:`.session`), the loop (:mod:`.loop`),
checkpoints (:mod:`.checkpoint`) and data parallelism (:mod:`.parallel`).

The loop owns everything generic: VAE-encoding the concept images (latent mean/std cached once, a fresh latent
sample drawn per step), sampling noise and timesteps from the pipeline's own noise schedule (``epsilon``,
``v_prediction`` or ``sample`` targets), the mask-weighted MSE, AdamW/Adam over per-group learning rates,
gradient accumulation, a seeded generator, the progress bar, checkpoints with exact resume, the non-finite-loss
check, wall time and peak memory. A method supplies a :class:`TrainingSession`: its parameter groups, how prompts
become encoder hidden states, and optional hooks (augmentation, extra loss, after-step fix-ups, extra state to
checkpoint, the artifact builder).

Optional, off by default (:class:`TrainConfig`; ``docs/architecture.md``, Training): gradient checkpointing,
bf16/fp16 autocast (fp16 with loss scaling), a training resolution, learning-rate schedules (diffusers'
``get_scheduler``), validation images and TensorBoard logs beside the checkpoint, 8-bit AdamW (bitsandbytes),
bfloat16 master weights and the step fused into the backward pass (:mod:`.bf16`); :func:`check_training` refuses
what the device, pipeline or installation cannot run, before any work.

With more than one CUDA device and a multi-process launch (``accelerate launch`` / ``torchrun``), or
``EDITBENCH_ACCELERATE=1``, the same loop runs data-parallel through ``accelerate`` (see :func:`use_accelerate`);
otherwise (CPU, one device) it is the plain single-process loop.

Shape legend: b batch, c latent channels, h/w latent height/width, H/W pixel height/width, n tokens, d width.
"""

from editbench.training.checkpoint import CHECKPOINT_FILE
from editbench.training.loop import check_training, train
from editbench.training.parallel import ACCELERATE_ENV, use_accelerate
from editbench.training.session import (
    Param,
    ParamGroup,
    StepContext,
    TrainConfig,
    TrainingSession,
    TrainResult,
    encode_prompts,
    masked_mse,
    tokenize,
)

__all__ = ["ACCELERATE_ENV", "CHECKPOINT_FILE", "Param", "ParamGroup", "StepContext", "TrainConfig", "TrainResult",
           "TrainingSession", "check_training", "encode_prompts", "masked_mse", "tokenize", "train", "use_accelerate"]
