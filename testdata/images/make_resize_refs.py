#!/usr/bin/env python3
"""Writes the resize references of pio-model's image tests (Pillow 13, `pip install pillow`):
a 151 x 101 noisy RGB image and Pillow's BICUBIC resizes of it, which transformers' Qwen2-VL
image processor and torchvision's antialiased bicubic resize match to a level or so.
Run from this directory."""
import random

from PIL import Image

random.seed(1)
src = Image.open("../synthetic/qwen3_vl/image.png").convert("RGB").resize((151, 101), Image.NEAREST)
px = src.load()
for y in range(src.height):
    for x in range(src.width):
        r, g, b = px[x, y]
        n = random.randint(-40, 40)
        px[x, y] = (max(0, min(255, r + n)), max(0, min(255, g - n)), max(0, min(255, b + n // 2)))
src.save("resize_src.png")
for w, h in [(224, 160), (64, 32), (96, 150), (160, 96)]:
    src.resize((w, h), Image.BICUBIC).save(f"resize_pil_{w}x{h}.png")
