"""MCLD's training step in PyTorch + diffusers, timed phase by phase, for a side-by-side with
`mcld bench train` on the same machine and threads.

It builds what MCLD's train.py trains (reference UNet writing a bank, denoising UNet reading it
with IP-adapter cross-attention and stage contexts, pose guider added after conv_in, 1280-wide
face projector) on diffusers' own random initialisation, feeds it random latents and embeddings
of the shapes the data loader gives, and times: reference UNet forward, denoising UNet forward +
loss, backward, AdamW (with grad-norm clipping). Not part of CI.

On `--device cuda` the networks are initialised on the GPU, each phase ends with
`torch.cuda.synchronize()` before the clock is read, attention is SDPA, f32 runs without TF32,
and the peak is `torch.cuda.max_memory_allocated()` over the whole run (weights, gradients and
AdamW's moments included). `--dtype f16` is the reference's `mixed_precision: fp16` as accelerate
runs it: f32 weights, fp16 autocast, a GradScaler around backward and the optimizer step;
`--dtype bf16` is bf16 autocast without a scaler.

Setup (a private venv outside the repository):
    python3 -m venv /work/venv-ref && /work/venv-ref/bin/pip install torch diffusers
Run, e.g. (same flags as `mcld bench train`):
    OMP_NUM_THREADS=2 /work/venv-ref/bin/python tools/reference/bench_train_torch.py \
        --size 256 --width half --steps 3 [--grad-checkpointing] [--dtype bf16]
    python3 tools/reference/bench_train_torch.py --device cuda --size 512 --width full \
        --dtype f16 --batch-size 12 --grad-checkpointing      # on the GPU machine
"""

import argparse
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel


def unet_config(width):
    ch = [320, 640, 1280, 1280]
    if width == "half":
        ch = [c // 2 for c in ch]
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        block_out_channels=ch,
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )


class PoseGuider(nn.Module):
    """ControlNet's conditioning embedding: conv 3->16, pairs to 32/96/256, conv_out to C."""

    def __init__(self, out_ch):
        super().__init__()
        ch = [16, 32, 96, 256]
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        blocks = []
        for a, b in zip(ch[:-1], ch[1:]):
            blocks += [nn.Conv2d(a, a, 3, padding=1), nn.Conv2d(a, b, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(ch[-1], out_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x):
        x = F.silu(self.conv_in(x))
        for b in self.blocks:
            x = F.silu(b(x))
        return self.conv_out(x)


class PerceiverAttention(nn.Module):
    def __init__(self, dim, dim_head=64, heads=20):
        super().__init__()
        self.heads, inner = heads, dim_head * heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], 1)).chunk(2, -1)
        split = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(o.transpose(1, 2).reshape(b, n, -1))


class Resampler(nn.Module):
    def __init__(self, dim=1280, depth=4, queries=16, emb=512, out=768):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(emb, dim)
        self.proj_out = nn.Linear(dim, out)
        self.norm_out = nn.LayerNorm(out)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim),
                    nn.Sequential(
                        nn.LayerNorm(dim),
                        nn.Linear(dim, dim * 4, bias=False),
                        nn.GELU(),
                        nn.Linear(dim * 4, dim, bias=False),
                    ),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, x):
        lat = self.latents.repeat(x.shape[0], 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            lat = attn(x, lat) + lat
            lat = ff(lat) + lat
        return self.norm_out(self.proj_out(lat))


def attend(attn, q, k, v):
    b = q.shape[0]
    split = lambda t: t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return o.transpose(1, 2).reshape(b, -1, q.shape[-1])


class State:
    """Per-step values the processors read: the bank and the stage contexts."""

    bank = {}
    ctx = {}
    writing = False


class SelfAttn:
    """attn1: the reference UNet records its input; the denoising UNet reads the bank."""

    def __init__(self, name, role):
        self.name, self.role = name, role

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        x = hidden_states
        kv = x
        if self.role == "reference":
            State.bank[self.name] = x
        elif self.name in State.bank:
            ref = State.bank[self.name].to(torch.float16).to(x.dtype)
            kv = torch.cat([x, ref], 1)
        o = attend(attn, attn.to_q(x), attn.to_k(kv), attn.to_v(kv))
        return attn.to_out[1](attn.to_out[0](o))


class CrossAttn:
    """attn2: the stage's context; in the denoising UNet the last 16 tokens go through IP."""

    def __init__(self, stage, ip=None):
        self.stage, self.ip = stage, ip

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        # The reference UNet (stage None) sees its own context, CLIP(source).
        ctx = State.ctx[self.stage] if self.stage else encoder_hidden_states
        q = attn.to_q(hidden_states)
        if self.ip is None:
            o = attend(attn, q, attn.to_k(ctx), attn.to_v(ctx))
        else:
            rest, face = ctx[:, :-16], ctx[:, -16:]
            o = attend(attn, q, attn.to_k(rest), attn.to_v(rest))
            o = o + 0.5 * attend(attn, q, self.ip.to_k_ip(face), self.ip.to_v_ip(face))
        return attn.to_out[1](attn.to_out[0](o))


class IpWeights(nn.Module):
    def __init__(self, ctx_dim, dim):
        super().__init__()
        self.to_k_ip = nn.Linear(ctx_dim, dim, bias=False)
        self.to_v_ip = nn.Linear(ctx_dim, dim, bias=False)


def install(unet, role):
    """Sets MCLD's processors; returns the IP modules (trainable) of the denoising UNet."""
    procs, ips = {}, nn.ModuleList()
    for name in unet.attn_processors:
        block = name.rsplit(".attn", 1)[0]
        stage = "down" if name.startswith("down") else "mid" if name.startswith("mid") else "up"
        if name.endswith("attn1.processor"):
            procs[name] = SelfAttn(block, role)
        else:
            ip = None
            if role == "denoising":
                attn = unet.get_submodule(name.rsplit(".processor", 1)[0])
                ip = IpWeights(768, attn.to_q.out_features)
                ips.append(ip)
            procs[name] = CrossAttn(stage if role == "denoising" else None, ip)
    unet.set_attn_processor(procs)
    return ips


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--width", choices=["full", "half"], default="full")
    p.add_argument("--optimizer", choices=["adamw", "none"], default="adamw")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cfg = unet_config(a.width)
    with dev:  # initialise the weights where they train (CPU init of 1.7 G values is slow)
        reference = UNet2DConditionModel(**cfg)
        denoising = UNet2DConditionModel(**cfg)
        install(reference, "reference")
        ips = install(denoising, "denoising")
        pose_guider = PoseGuider(cfg["block_out_channels"][0])
        proj = Resampler()
    for m in (reference, denoising, ips, pose_guider, proj):
        m.to(dev)
    for n, prm in reference.named_parameters():
        prm.requires_grad_("up_blocks.3" not in n)
    if a.grad_checkpointing:
        reference.enable_gradient_checkpointing()
        denoising.enable_gradient_checkpointing()
    params = [
        prm
        for m in (reference, denoising, ips, pose_guider, proj)
        for prm in m.parameters()
        if prm.requires_grad
    ]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
    )
    pose_feat = {}
    denoising.conv_in.register_forward_hook(lambda m, i, o: o + pose_feat["x"])

    b, h = a.batch_size, a.size // 8
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g).to(dev)
    latents, noise, ref_latents = r(b, 4, h, h), r(b, 4, h, h), r(b, 4, h, h)
    clip_src, clip_tex, face = r(b, 1, 768), r(b, 1, 768), r(b, 1, 512)
    pose = r(b, 3, a.size, a.size).abs().clamp(0, 1)
    t = torch.tensor([(137 + 311 * i) % 1000 for i in range(b)], device=dev)
    mask = ((pose[:, 2:3] * 255).round() == 23) | ((pose[:, 2:3] * 255).round() == 24)
    mask = F.interpolate(mask.float(), size=(h, h), mode="nearest")
    amp = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)
    scaler = torch.amp.GradScaler(dev.type) if a.dtype == "f16" and cuda else None

    totals = [0.0] * 4
    n_params = sum(prm.numel() for prm in params)
    where = torch.cuda.get_device_name(dev) if cuda else f"{torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {where}, {n_params / 1e6:.1f} M trainable, {a.size}x{a.size}, "
        f"batch {b}, width {a.width}, {a.dtype}, checkpointing {a.grad_checkpointing}"
    )
    for step in range(a.warmup + a.steps):
        opt.zero_grad(set_to_none=True)
        ctxm = torch.autocast(dev.type, dtype=amp) if amp else torch.autocast(dev.type, enabled=False)
        t0 = time.perf_counter()
        with ctxm:
            State.bank = {}
            reference(ref_latents, torch.zeros_like(t), clip_src)
        sync()
        t1 = time.perf_counter()
        with ctxm:
            tokens = proj(face)
            State.ctx = {
                "down": torch.cat([clip_src, tokens], 1),
                "mid": torch.cat([clip_src, clip_tex, tokens], 1),
                "up": torch.cat([clip_tex, tokens], 1),
            }
            pose_feat["x"] = pose_guider(pose)
            noisy = sched.add_noise(latents, noise, t)
            target = sched.get_velocity(latents, noise, t)
            pred = denoising(noisy, t, State.ctx["down"]).sample.float()
        ac = sched.alphas_cumprod.to(dev)[t]
        snr = ac / (1 - ac)
        w = torch.clamp(snr + 1, max=5.0) / (snr + 1)
        per = ((pred - target) ** 2 + (pred * mask - target * mask) ** 2).mean(dim=(1, 2, 3))
        loss = (per * w).mean()
        loss_v = loss.item()
        t2 = time.perf_counter()
        (scaler.scale(loss) if scaler else loss).backward()
        sync()
        t3 = time.perf_counter()
        if a.optimizer == "adamw":
            if scaler:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        sync()
        t4 = time.perf_counter()
        ph = [t1 - t0, t2 - t1, t3 - t2, t4 - t3]
        tag = "timed " if step >= a.warmup else "warm-up"
        print(
            f"{tag} step {step}: reference UNet {ph[0]:.2f} s, denoising UNet + loss {ph[1]:.2f} s, "
            f"backward {ph[2]:.2f} s, optimizer {ph[3]:.2f} s, loss {loss_v:.4f}"
        )
        if step >= a.warmup:
            totals = [x + y for x, y in zip(totals, ph)]
    n = max(a.steps, 1)
    per_step = sum(totals) / n
    print(
        f"per step (mean of {a.steps}): reference UNet {totals[0] / n:.2f} s | denoising UNet + loss "
        f"{totals[1] / n:.2f} s | backward {totals[2] / n:.2f} s | optimizer {totals[3] / n:.2f} s | "
        f"total {per_step:.2f} s = {1 / per_step:.3f} steps/s, {b / per_step:.3f} samples/s"
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
