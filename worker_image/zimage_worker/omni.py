"""Variants edit and omni (issue 19): diffusers' ``ZImageOmniPipeline``, reference images in, image out.

The condition images reach the transformer twice: as VAE latents beside the noisy target latent (marked clean by
the noise mask) and as SigLIP2 features; the prompt gets one ``<|vision_start|>…<|vision_end|>`` slot per image.
An edit job's images are its ``inputImage`` followed by its ``referenceImages``; an omni text-to-image job has
none and runs the same pipeline unconditioned.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ZImageOmniPipeline


class OmniPipeline(ZImageOmniPipeline):
    """``ZImageOmniPipeline`` with its condition images encoded in the VAE's own dtype.

    diffusers 0.42 casts them to bfloat16 before ``vae.encode`` whatever the VAE's dtype is, which fails on a
    float32 VAE (the CPU default: "Input type (BFloat16) and bias type (float) should be the same") and loses
    precision on a float16 one. Encoding in the VAE's dtype is the same arithmetic as upstream on a bfloat16
    model, the released checkpoints' dtype.
    """

    def prepare_image_latents(
        self, images: list[torch.Tensor], batch_size: int, device: torch.device, dtype: torch.dtype
    ) -> list[list[torch.Tensor]]:
        pipe: Any = self  # diffusers registers its modules as attributes mypy cannot see
        vae = pipe.vae
        latents = []
        for image in images:
            encoded = vae.encode(image.to(device=device, dtype=vae.dtype)).latent_dist.mode()[0]
            latent = (encoded - vae.config.shift_factor) * vae.config.scaling_factor
            latents.append(latent.unsqueeze(1).to(dtype))
        return [latents.copy() for _ in range(batch_size)]
