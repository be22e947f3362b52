"""MCLD's sampling pipeline in PyTorch + diffusers + transformers, timed phase by phase, for a
side-by-side with `mcld bench pipeline` on the same machine and threads.

Same networks at the same sizes as `mcld bench pipeline` builds them with random weights: CLIP
ViT-L/14 vision tower (twice: source and texture), sd-vae-ft-mse (texture encode, final decode),
the reference UNet (once, writing the attention bank), pose guider and 1280-wide face projector,
then `--steps` guided DDIM steps of the denoising UNet on the doubled batch (bank read in every
self-attention, IP-adapter cross-attention on the 16 face tokens, stage contexts), and the
decode. The MCLD modules are those of bench_train_torch.py. Phases: condition (CLIP x2 + VAE
encode), reference UNet + pose guider + projector, guided steps, decode; as mcld reports them.

`--dtype bf16|f16` converts every module and input to that type (what a CPU user picks in
PyTorch; on CUDA the same pure half precision `mcld bench pipeline --dtype` runs). On `--device
cuda` the networks are built on the GPU, each phase ends with `torch.cuda.synchronize()` before
the clock is read, attention is SDPA (`F.scaled_dot_product_attention` in MCLD's processors,
diffusers' AttnProcessor2_0 elsewhere), and the peak is `torch.cuda.max_memory_allocated()` over
the whole run, weights included. `--batch-size B` runs B pairs per forward pass (2B with
guidance), as `mcld bench pipeline --batch-size`. Not part of CI.

Setup (a private venv outside the repository):
    python3 -m venv /work/venv-ref && /work/venv-ref/bin/pip install torch diffusers transformers
Run, e.g. (same flags as `mcld bench pipeline`):
    OMP_NUM_THREADS=2 /work/venv-ref/bin/python tools/reference/bench_pipeline_torch.py \
        --size 512 --steps 2 --images 1 --dtype bf16
    python3 tools/reference/bench_pipeline_torch.py --device cuda --dtype f16 --batch-size 4 \
        --size 512 --steps 20 --images 4       # on the GPU machine (scripts/gpu-run.sh)
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
    p.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.images < 1 or a.batch_size < 1:
        p.error("--images and --batch-size must be at least 1")
    torch.manual_seed(0)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda:
        # f32 as mcld's f32 path multiplies: no TF32 (it only matters for --dtype f32).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    t0 = time.perf_counter()
    cfg = unet_config("full")
    with dev:  # initialise the weights where they run (CPU init of 2 G values takes minutes)
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
        m.to(device=dev, dtype=dt).eval()
    sync()
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
    where = torch.cuda.get_device_name(dev) if cuda else f"{torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {where}, {a.dtype}, {a.size}x{a.size}, {a.steps} DDIM steps, "
        f"batch {a.batch_size}; built in {time.perf_counter() - t0:.1f} s"
    )

    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g).to(device=dev, dtype=dt)
    h = a.size // 8
    guidance = 3.5
    b = a.batch_size

    @torch.inference_mode()
    def one_batch():
        ph = []
        sync()
        t = time.perf_counter()
        src = clip(r(b, 3, 224, 224)).image_embeds.unsqueeze(1)
        tex = clip(r(b, 3, 224, 224)).image_embeds.unsqueeze(1)
        ref_latents = vae.encode(r(b, 3, a.size, a.size)).latent_dist.mean * 0.18215
        sync()
        ph.append(time.perf_counter() - t)
        t = time.perf_counter()
        State.bank = {}
        reference(ref_latents, torch.zeros(b, dtype=torch.long, device=dev), src)
        State.bank = {k: torch.cat([v, v]) for k, v in State.bank.items()}
        tokens = proj(r(b, 1, 512))
        z = lambda x: torch.zeros_like(x)
        State.ctx = {
            "down": torch.cat([torch.cat([z(src), z(tokens)], 1), torch.cat([src, tokens], 1)]),
            "mid": torch.cat(
                [torch.cat([z(src), z(tex), z(tokens)], 1), torch.cat([src, tex, tokens], 1)]
            ),
            "up": torch.cat([torch.cat([z(tex), z(tokens)], 1), torch.cat([tex, tokens], 1)]),
        }
        pose_feat["x"] = pose_guider(r(b, 3, a.size, a.size).abs().clamp(0, 1)).repeat(2, 1, 1, 1)
        sync()
        ph.append(time.perf_counter() - t)
        t = time.perf_counter()
        lat = r(b, 4, h, h)
        for ts in sched.timesteps:
            out = denoising(torch.cat([lat, lat]), ts, State.ctx["down"]).sample
            un, co = out.chunk(2)
            lat = sched.step(un + guidance * (co - un), ts, lat).prev_sample
        sync()
        ph.append(time.perf_counter() - t)
        t = time.perf_counter()
        img = vae.decode(lat / 0.18215).sample
        sync()
        ph.append(time.perf_counter() - t)
        assert torch.isfinite(img.float()).all(), "non-finite image"
        return ph

    for _ in range(a.warmup):
        print(f"warm-up batch: {sum(one_batch()):.2f}s")
    batches = -(-a.images // b)
    tot = [0.0] * 4
    for i in range(batches):
        ph = one_batch()
        tot = [x + y for x, y in zip(tot, ph)]
        print(
            f"batch {i + 1}/{batches}: {sum(ph):.2f}s (condition {ph[0]:.2f}, reference UNet + "
            f"pose + projector {ph[1]:.2f}, {a.steps} steps {ph[2]:.2f}, decode {ph[3]:.2f})"
        )
    n = batches * b
    print(
        f"per image: {sum(tot) / n:.3f}s total = condition (CLIP x2 + VAE encode) {tot[0] / n:.3f}s "
        f"+ reference UNet, pose guider, projector {tot[1] / n:.3f}s + {a.steps} guided steps "
        f"{tot[2] / n:.3f}s ({tot[2] / n / max(a.steps, 1):.3f}s/step) + VAE decode {tot[3] / n:.3f}s"
    )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if cuda:
        print(
            f"peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB allocated, "
            f"{torch.cuda.max_memory_reserved(dev) / 2**30:.2f} GiB reserved "
            "(torch.cuda.max_memory_allocated/reserved)"
        )


if __name__ == "__main__":
    main()
