"""MCLD's sampling pipeline in PyTorch + diffusers + transformers, timed phase by phase, for a
side-by-side with `mcld bench pipeline` on the same machine and threads.

Same networks at the same sizes as `mcld bench pipeline` builds them with random weights: CLIP
ViT-L/14 vision tower (twice: source and texture), sd-vae-ft-mse (texture encode, final decode),
the reference UNet (once, writing the attention bank), pose guider and 1280-wide face projector,
then `--steps` guided DDIM steps of the denoising UNet on the doubled batch (bank read in every
self-attention, IP-adapter cross-attention on the 16 face tokens, stage contexts), and the
decode. The MCLD modules are those of bench_train_torch.py. Phases: condition (CLIP x2 + VAE
encode), reference UNet + pose guider + projector, guided steps, decode; as mcld reports them.

`--dtype bf16` converts every module and input to bfloat16 (what a CPU user picks in PyTorch;
oneDNN multiplies bf16 with f32 accumulation). Not part of CI.

Setup (a private venv outside the repository):
    python3 -m venv /work/venv-ref && /work/venv-ref/bin/pip install torch diffusers transformers
Run, e.g. (same flags as `mcld bench pipeline`):
    OMP_NUM_THREADS=2 /work/venv-ref/bin/python tools/reference/bench_pipeline_torch.py \
        --size 512 --steps 2 --images 1 --dtype bf16
"""

import argparse
import os
import resource
import sys
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_torch import PoseGuider, Resampler, State, install, unet_config  # noqa: E402


def vae_config():
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
    )


def clip_config():
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        projection_dim=768,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dt = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    t0 = time.perf_counter()
    cfg = unet_config("full")
    reference = UNet2DConditionModel(**cfg)
    denoising = UNet2DConditionModel(**cfg)
    install(reference, "reference")
    ips = install(denoising, "denoising")
    pose_guider = PoseGuider(cfg["block_out_channels"][0])
    proj = Resampler()
    vae = AutoencoderKL(**vae_config())
    clip = CLIPVisionModelWithProjection(clip_config())
    nets = (reference, denoising, ips, pose_guider, proj, vae, clip)
    for m in nets:
        m.to(dt).eval()
    pose_feat = {}
    denoising.conv_in.register_forward_hook(lambda m, i, o: o + pose_feat["x"])
    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    sched.set_timesteps(a.steps)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.dtype}, "
        f"{a.size}x{a.size}, {a.steps} DDIM steps; built in {time.perf_counter() - t0:.1f} s"
    )

    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g).to(dt)
    h = a.size // 8
    guidance = 3.5

    @torch.inference_mode()
    def one_image():
        ph = []
        t = time.perf_counter()
        src = clip(r(1, 3, 224, 224)).image_embeds.unsqueeze(1)
        tex = clip(r(1, 3, 224, 224)).image_embeds.unsqueeze(1)
        ref_latents = vae.encode(r(1, 3, a.size, a.size)).latent_dist.mean * 0.18215
        ph.append(time.perf_counter() - t)
        t = time.perf_counter()
        State.bank = {}
        reference(ref_latents, torch.zeros(1, dtype=torch.long), src)
        State.bank = {k: torch.cat([v, v]) for k, v in State.bank.items()}
        tokens = proj(r(1, 1, 512))
        z = lambda x: torch.zeros_like(x)
        State.ctx = {
            "down": torch.cat([torch.cat([z(src), z(tokens)], 1), torch.cat([src, tokens], 1)]),
            "mid": torch.cat(
                [torch.cat([z(src), z(tex), z(tokens)], 1), torch.cat([src, tex, tokens], 1)]
            ),
            "up": torch.cat([torch.cat([z(tex), z(tokens)], 1), torch.cat([tex, tokens], 1)]),
        }
        pose_feat["x"] = pose_guider(r(1, 3, a.size, a.size).abs().clamp(0, 1)).repeat(2, 1, 1, 1)
        ph.append(time.perf_counter() - t)
        t = time.perf_counter()
        lat = r(1, 4, h, h)
        for ts in sched.timesteps:
            out = denoising(torch.cat([lat, lat]), ts, State.ctx["down"]).sample
            un, co = out.chunk(2)
            lat = sched.step(un + guidance * (co - un), ts, lat).prev_sample
        ph.append(time.perf_counter() - t)
        t = time.perf_counter()
        img = vae.decode(lat / 0.18215).sample
        ph.append(time.perf_counter() - t)
        assert torch.isfinite(img.float()).all(), "non-finite image"
        return ph

    for _ in range(a.warmup):
        print(f"warm-up image: {sum(one_image()):.2f} s")
    tot = [0.0] * 4
    for i in range(a.images):
        ph = one_image()
        tot = [x + y for x, y in zip(tot, ph)]
        print(
            f"image {i + 1}/{a.images}: {sum(ph):.2f} s (condition {ph[0]:.2f}, reference UNet + "
            f"pose + projector {ph[1]:.2f}, {a.steps} steps {ph[2]:.2f}, decode {ph[3]:.2f})"
        )
    n = a.images
    print(
        f"per image: {sum(tot) / n:.3f}s total = condition (CLIP x2 + VAE encode) {tot[0] / n:.3f}s "
        f"+ reference UNet, pose guider, projector {tot[1] / n:.3f}s + {a.steps} guided steps "
        f"{tot[2] / n:.3f}s ({tot[2] / n / max(a.steps, 1):.3f}s/step) + VAE decode {tot[3] / n:.3f}s"
    )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
