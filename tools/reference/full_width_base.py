"""Turns the tiny base models of `mcld demo --train --workdir DIR` into full-width ones with
random weights, so `mcld train --config DIR/train.yaml` trains MCLD's real trainable set (two
SD-1.5-size UNets, the 320-channel pose guider) on the demo's small images. Used by
scripts/gpu-run.sh (step 5) where nothing can be downloaded. Not part of CI.

Rewrites under DIR/pretrained_weights/:
  sd-image-variations-diffusers/unet/           diffusers' SD-1.5 UNet (random init)
  sd-image-variations-diffusers/image_encoder/  a 2-layer CLIP vision tower projecting to 768
                                                (the UNets' cross-attention width; frozen, so
                                                its size does not matter to the step)
  control_v11p_sd15_seg/                        controlnet_cond_embedding.* at 320 channels
and DIR/clip_std.npy (per-dimension CLIP std, now 768 values).

    python3 tools/reference/full_width_base.py DIR [--device cuda]
"""

import argparse
import json
import os
import sys

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_torch import PoseGuider, unet_config  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.manual_seed(0)
    pre = os.path.join(a.dir, "pretrained_weights")
    base = os.path.join(pre, "sd-image-variations-diffusers")
    for d in (os.path.join(base, "unet"), os.path.join(base, "image_encoder")):
        if not os.path.isdir(d):
            sys.exit(f"{d}: missing; run `mcld demo --train --workdir {a.dir}` first")
    cfg = unet_config("full")
    with torch.device(a.device):
        unet = UNet2DConditionModel(**cfg)
    unet.to("cpu").save_pretrained(os.path.join(base, "unet"), safe_serialization=True)
    clip = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            projection_dim=cfg["cross_attention_dim"],
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=14,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        )
    )
    clip.save_pretrained(os.path.join(base, "image_encoder"), safe_serialization=True)
    guider = PoseGuider(cfg["block_out_channels"][0])
    cn = os.path.join(pre, "control_v11p_sd15_seg")
    os.makedirs(cn, exist_ok=True)
    save_file(
        {f"controlnet_cond_embedding.{k}": v.contiguous() for k, v in guider.state_dict().items()},
        os.path.join(cn, "diffusion_pytorch_model.safetensors"),
    )
    with open(os.path.join(cn, "config.json"), "w") as f:
        json.dump({"_class_name": "ControlNetModel", "block_out_channels": cfg["block_out_channels"]}, f)
    import numpy as np

    std = np.full((cfg["cross_attention_dim"],), 0.5, dtype=np.float32)
    np.save(os.path.join(a.dir, "clip_std.npy"), std)
    n = sum(x.numel() for x in unet.parameters())
    print(f"wrote a full-width random UNet ({n / 1e6:.0f} M values), CLIP -> 768 and a 320-channel pose guider under {pre}")


if __name__ == "__main__":
    main()
