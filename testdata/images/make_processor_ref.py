#!/usr/bin/env python3
"""Writes processor_resize_src.safetensors for pio-model's image tests: `resize_src.png` (151 x
101, so smart_resize changes its size to 160 x 96) through transformers' Qwen2-VL image processor
(`Qwen2VLImageProcessorPil`, transformers 5.24, no torch needed) with the qwen3_vl fixture's
preprocessor config: `pixel_values` [60, 1536] f32 and `image_grid_thw` [1, 3] i64.
`pip install transformers pillow numpy safetensors`; run from this directory."""
import json

import numpy as np
from PIL import Image
from safetensors.numpy import save_file
from transformers import Qwen2VLImageProcessorPil

cfg = json.load(open("../synthetic/qwen3_vl/preprocessor_config.json"))
cfg.pop("image_processor_type", None)
out = Qwen2VLImageProcessorPil(**cfg)(images=[Image.open("resize_src.png").convert("RGB")], return_tensors="np")
save_file(
    {
        "pixel_values": np.ascontiguousarray(out["pixel_values"], dtype=np.float32),
        "image_grid_thw": np.ascontiguousarray(out["image_grid_thw"], dtype=np.int64),
    },
    "processor_resize_src.safetensors",
)
