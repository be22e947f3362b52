"""Inputs for timing `mcld evaluate` where nothing can be downloaded (the GPU machine): the
metric networks with random weights in the files and layouts `mcld download --only evaluate`
fetches, and synthetic image sets in the reference's layout.

Writes under OUT:
  pretrained/inception_v3_google-0cc3c7bd.pth   torchvision's Inception v3 (aux head included)
  pretrained/alexnet-owt-7be5be79.pth           torchvision's AlexNet
  pretrained/lpips/alex.pth                     lpips v0.1's linear heads (lin{k}.model.1.weight)
  gt/{256,512}/, gen/{256,512}/                 PAIRS same-named PNGs at 176x256 and 352x512
  train/                                        REAL JPEGs at 176x256, FID's real set
Random weights give meaningless scores; the run only times the metrics. The face models are not
made: `mcld evaluate` reports their absence after writing the other metrics. Not part of CI.

    python3 tools/reference/make_eval_inputs.py OUT --pairs 300 --real 300
"""

import argparse
import os
from multiprocessing import Pool

import numpy as np
import torch
from PIL import Image


def image(seed, w, h):
    """A smooth random picture: a low-resolution noise field scaled up (fast to encode)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(8, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def write_pair(args):
    out, i = args
    name = f"img{i:05d}_2_pose{i:05d}.png"
    for sub, (w, h) in (("256", (176, 256)), ("512", (352, 512))):
        image(2 * i, w, h).save(os.path.join(out, "gt", sub, name))
        image(2 * i + 1, w, h).save(os.path.join(out, "gen", sub, name))


def write_real(args):
    out, i = args
    image(10**6 + i, 176, 256).save(os.path.join(out, "train", f"real{i:05d}.jpg"), quality=90)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--pairs", type=int, default=300)
    p.add_argument("--real", type=int, default=300)
    a = p.parse_args()
    import torchvision

    torch.manual_seed(0)
    pre = os.path.join(a.out, "pretrained")
    os.makedirs(os.path.join(pre, "lpips"), exist_ok=True)
    inc = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(inc.state_dict(), os.path.join(pre, "inception_v3_google-0cc3c7bd.pth"))
    torch.save(
        torchvision.models.alexnet(weights=None).state_dict(),
        os.path.join(pre, "alexnet-owt-7be5be79.pth"),
    )
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate([64, 192, 384, 256, 256])}
    torch.save(lins, os.path.join(pre, "lpips", "alex.pth"))
    for d in ("gt/256", "gt/512", "gen/256", "gen/512", "train"):
        os.makedirs(os.path.join(a.out, d), exist_ok=True)
    with Pool(min(8, os.cpu_count() or 1)) as pool:
        pool.map(write_pair, [(a.out, i) for i in range(a.pairs)])
        pool.map(write_real, [(a.out, i) for i in range(a.real)])
    print(f"wrote random metric weights and {a.pairs} pairs, {a.real} real images under {a.out}")


if __name__ == "__main__":
    main()
