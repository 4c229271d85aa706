"""A tiny randomly initialised Stable Diffusion pipeline saved in diffusers layout, standing in for a user's local
SD directory (nothing is downloaded)."""
import json

import torch


def write_tiny_sd_pipeline(path):
    """A randomly initialised SD-layout pipeline with tiny components, saved like a real one."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["<|startoftext|>", "<|endoftext|>", "!"] + list(letters) + [c + "</w>" for c in letters]
    (path / "tok").mkdir(parents=True)
    (path / "tok" / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (path / "tok" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "tok" / "vocab.json"), str(path / "tok" / "merges.txt"), model_max_length=8)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=8)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=8, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path / "sd")
    return path / "sd"
