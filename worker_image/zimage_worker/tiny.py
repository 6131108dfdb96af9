"""Random-weight Z-Image pipelines, built entirely offline: a tiny one for tests, a full-size one for GPU
benchmarks (``build_full_size_pipeline``).

It exercises the real diffusers code path (prompt encoding with the chat template, the transformer, the
flow-matching scheduler, VAE decode) in tens of milliseconds on a CPU, so the worker, the queue and the
end-to-end tests can run the genuine engine without model weights or network access. The images are noise
with structure, not pictures.

Component sizes follow diffusers' own Z-Image fast tests. Those tests download a tokenizer from the Hub;
here a byte-level tokenizer is built in memory instead, so nothing is fetched.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import ZImagePipeline
    from transformers import PreTrainedTokenizerBase

# The pipeline renders every prompt through the tokenizer's chat template (Qwen3 style, with the
# `enable_thinking` switch the pipeline passes), so the tiny tokenizer needs one too.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# The omni pipeline marks where each condition image goes in the prompt with these.
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>"]

TEXT_HIDDEN_SIZE = 16
LATENT_CHANNELS = 16

# The tiny transformer: sizes of diffusers' own Z-Image fast tests.
TINY_TRANSFORMER: dict[str, Any] = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": LATENT_CHANNELS,
    "dim": 32,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "qk_norm": True,
    "cap_feat_dim": TEXT_HIDDEN_SIZE,
    "axes_dims": [8, 4, 4],
    # RoPE tables must cover the longest caption (512 tokens plus padding) and the largest image the
    # schema allows: 2048 px / VAE factor 2 / patch 2 = 512 positions per side.
    "axes_lens": [1024, 512, 512],
}


def build_tiny_tokenizer(extra_tokens: list[str] | None = None) -> PreTrainedTokenizerBase:
    """A byte-level tokenizer with no merges: every UTF-8 byte is one token, so any prompt encodes.
    ``extra_tokens``: special tokens after ``SPECIAL_TOKENS`` (the omni pipeline's ``VISION_TOKENS``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Sorted so token ids do not depend on set iteration order.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS + (extra_tokens or []))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        # Right padding keeps prompt tokens at the same positions for the causal text encoder.
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def build_tiny_pipeline(seed: int = 0, extra_tokens: list[str] | None = None) -> ZImagePipeline:
    """Build a text-to-image ZImagePipeline with small random weights, identical for the same ``seed``.

    Sizes: the VAE has four blocks (spatial factor 8, as on the real model), so heights and widths must be
    multiples of 16, which is what the job schema allows (64 to 2048). The pipeline is returned on the CPU
    in float32. The global torch RNG state is left as it was.
    """
    return _random_pipeline(
        seed=seed,
        extra_tokens=extra_tokens,
        transformer=TINY_TRANSFORMER,
        # Four blocks like the real Flux VAE (spatial factor 8), so a 1024x1024 job is a 64x64 token grid as
        # on the real model, not 256x256: fast enough on a CPU at any size the schema allows. No mid-block
        # attention: over a 128x128 latent it alone would dominate the CPU time.
        vae={
            "block_out_channels": [8, 8, 16, 16],
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "sample_size": 32,
            "mid_block_add_attention": False,
        },
        text_encoder={
            "hidden_size": TEXT_HIDDEN_SIZE,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": TEXT_HIDDEN_SIZE // 2,
            "max_position_embeddings": 1024,
        },
    )


# The omni pipeline's SigLIP2 image encoder, tiny: 16-pixel patches, at most 64 of them per image.
TINY_SIGLIP: dict[str, Any] = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "patch_size": 16,
    "num_patches": 64,
}


def build_tiny_omni_pipeline(seed: int = 0) -> Any:
    """The tiny pipeline as a ``ZImageOmniPipeline`` (variants edit and omni: reference images in, image out):
    the same VAE and text encoder sizes, a transformer that also takes SigLIP features, and a tiny SigLIP2
    vision encoder with its image processor. Identical for the same ``seed``; the caller's RNG is left alone."""
    import torch
    from diffusers import ZImageTransformer2DModel
    from transformers import Siglip2ImageProcessorPil, Siglip2VisionConfig, Siglip2VisionModel

    from zimage_worker.omni import OmniPipeline

    text: Any = build_tiny_pipeline(seed, extra_tokens=VISION_TOKENS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        transformer: Any = ZImageTransformer2DModel(**TINY_TRANSFORMER, siglip_feat_dim=TINY_SIGLIP["hidden_size"])
        with torch.no_grad():  # uninitialised pad tokens (torch.empty) would put NaNs in the output
            for pad in (transformer.x_pad_token, transformer.cap_pad_token, transformer.siglip_pad_token):
                pad.fill_(1.0)
        siglip = Siglip2VisionModel(Siglip2VisionConfig(**TINY_SIGLIP))
    components = {**text.components, "transformer": transformer}
    processor = Siglip2ImageProcessorPil(
        patch_size=TINY_SIGLIP["patch_size"], max_num_patches=TINY_SIGLIP["num_patches"]
    )
    pipe: Any = OmniPipeline(**components, siglip=siglip, siglip_processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The attention projections of every transformer block: where LoRA adapters for diffusion transformers usually go.
ATTENTION_PROJECTIONS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")


def build_tiny_lora(
    path: str | Path,
    *,
    seed: int,
    rank: int = 4,
    target_modules: tuple[str, ...] = ATTENTION_PROJECTIONS,
    strength: float = 0.1,
    transformer: dict[str, Any] | None = None,
) -> Path:
    """Write a LoRA adapter with random weights for the tiny pipeline's transformer (``transformer``: another
    transformer config, e.g. ``{}`` for the full-size one) to the directory ``path``, in the diffusers format
    that ``load_lora_weights`` reads (``pytorch_lora_weights.safetensors``). Returns that file.

    Both matrices are random (B is not the zero of a freshly initialised LoRA), so the adapter changes pixels;
    ``strength`` scales B, small enough by default that the change grows with the adapter's scale instead of
    saturating. The same ``seed`` gives the same weights; the caller's RNG is left alone.
    """
    import torch
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    model: Any
    with torch.device("meta"):  # only the shapes of the target layers are needed
        model = ZImageTransformer2DModel(**(TINY_TRANSFORMER if transformer is None else transformer))
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in target_modules):
            down = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            up = strength * torch.randn(module.out_features, rank, generator=generator) / rank**0.5
            layers[f"{name}.lora_A.weight"] = down
            layers[f"{name}.lora_B.weight"] = up
    if not layers:
        raise ValueError(f"no linear layer of the transformer matches {target_modules}")
    out = Path(path)
    ZImagePipeline.save_lora_weights(out, transformer_lora_layers=layers)
    return out / "pytorch_lora_weights.safetensors"


def build_full_size_pipeline(device: str = "cuda", dtype: str = "bfloat16", seed: int = 0) -> ZImagePipeline:
    """Z-Image-Turbo's architecture at full size with random weights: the same shapes, parameter count (6B
    transformer, a Qwen3-4B text encoder, the 16-channel Flux VAE) and so the same FLOPs per step as the
    released model, for timings where the weights cannot be downloaded. The images are noise.

    Built directly on ``device`` in ``dtype`` (about 20 GB of bfloat16 weights; initialising them on a CPU
    would take minutes). The tokenizer is the tiny byte-level one: prompts become a few times more caption
    tokens than Qwen's tokenizer would make, a few percent of a 1024x1024 image's 4096 image tokens.
    """
    return _random_pipeline(
        seed=seed,
        device=device,
        dtype=dtype,
        scheduler_shift=3.0,
        transformer={},  # diffusers' defaults are the released model's config
        vae={  # the Flux VAE
            "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "sample_size": 1024,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        },
        text_encoder={  # Qwen3-4B
            "hidden_size": 2560,
            "intermediate_size": 9728,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 40960,
        },
    )


def _random_pipeline(
    *,
    seed: int,
    transformer: dict[str, Any],
    vae: dict[str, Any],
    text_encoder: dict[str, Any],
    device: str | None = None,
    dtype: str | None = None,
    scheduler_shift: float | None = None,
    extra_tokens: list[str] | None = None,
) -> ZImagePipeline:
    """A ZImagePipeline of the given component sizes with random weights seeded ``seed``, built on ``device``
    (default: the CPU) in ``dtype`` (default: float32), leaving the caller's RNG and default dtype alone."""
    import contextlib

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tiny_tokenizer(extra_tokens)
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device) if device else contextlib.nullcontext():
        torch.manual_seed(seed)
        if dtype:
            torch.set_default_dtype(getattr(torch, dtype))
        try:
            # Any: diffusers' classes are too loosely typed for mypy to see the pad-token parameters.
            model: Any = ZImageTransformer2DModel(**transformer)
            # The pad tokens start uninitialised (torch.empty); garbage there turns into NaNs in the output.
            with torch.no_grad():
                model.x_pad_token.fill_(1.0)
                model.cap_pad_token.fill_(1.0)
            autoencoder = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4,
                latent_channels=LATENT_CHANNELS,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                **vae,
            )
            encoder = Qwen3Model(
                Qwen3Config(
                    vocab_size=len(tokenizer),
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **text_encoder,
                )
            )
        finally:
            torch.set_default_dtype(previous)
    scheduler = FlowMatchEulerDiscreteScheduler(**({"shift": scheduler_shift} if scheduler_shift else {}))
    pipe: Any = ZImagePipeline(
        scheduler=scheduler, vae=autoencoder, text_encoder=encoder, tokenizer=tokenizer, transformer=model
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
