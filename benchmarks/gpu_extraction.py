"""GPU path check: raw bf16 inference throughput of a backbone against fedtl's extraction, on the same card.

Prints figures, asserts nothing. Raw: the backbone alone, channels-last, bf16 autocast, on a batch already
on the GPU (the ceiling). fedtl: `shared/features.extract_features` over uint8 images in host memory (its
preprocessing, transfer and bf16 forward): what a site runs once per data set. Same images, batch size,
backbone and card, best of a few repetitions after warm-up.

Run: `.venv/bin/python benchmarks/gpu_extraction.py [--backbone efficientnet_lite0] [--images 4096]`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedtl.shared.backbones import build_backbone, resolve_preprocessing
from fedtl.shared.features import extract_features


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    """Measure and print raw and fedtl images/s."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible: this benchmark measures the GPU path")
    pre = resolve_preprocessing(args.backbone)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, pre.image_size, pre.image_size, 3), dtype=np.uint8)
    model = build_backbone(args.backbone).eval().to("cuda", memory_format=torch.channels_last)
    batch = pre.apply(images[: args.batch_size]).to("cuda").contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def raw() -> None:
        for _ in range(0, args.images, args.batch_size):
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                model(batch)

    def fedtl() -> None:
        extract_features(model, images, pre, batch_size=args.batch_size, device="cuda", progress=False)

    raw(), fedtl()  # warm-up: kernels, allocator
    raw_s, fedtl_s = _best(raw, args.repeats), _best(fedtl, args.repeats)
    card = torch.cuda.get_device_name(0)
    print(f"card: {card}; backbone {args.backbone} at {pre.image_size} px, batch {args.batch_size}")
    print(f"raw bf16 inference: {args.images / raw_s:,.0f} images/s")
    share = 100 * raw_s / fedtl_s
    print(f"fedtl extraction:   {args.images / fedtl_s:,.0f} images/s ({share:.1f}% of raw; target >= 90%)")


if __name__ == "__main__":
    main()
