"""GPU path check: raw bf16 inference throughput of a backbone against fedtl's extraction, on the same card.

Prints figures, asserts nothing. Raw: the backbone alone, channels-last, bf16 autocast, on a batch already
on the GPU (the ceiling). fedtl: `shared/features.extract_features` over uint8 images in host memory (its
preprocessing, transfer and bf16 forward): what a site runs once per data set. Same images, batch size,
backbone and card, best of a few repetitions after warm-up. Then fedtl again from --small-size px images (MedMNIST's
28 by default), which it resizes on the card: the bytes sent shrink, the backbone's work does not.

Run: `.venv/bin/python benchmarks/gpu_extraction.py [--backbone efficientnet_lite0] [--images 4096]`; `--device cpu`
rehearses it where no card is (float32, the same code but the card's synchronisation).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedtl.shared.backbones import build_backbone, resolve_preprocessing
from fedtl.shared.features import extract_features
from fedtl.shared.heap import reuse_freed_memory


def _best(fn, repeats: int, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    """Measure and print raw and fedtl images/s."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small-size", type=int, default=28, help="px of the small images fedtl resizes on the card")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a rehearsal, in float32")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible: this benchmark measures the GPU path (--device cpu rehearses it)")
    device = args.device
    pre = resolve_preprocessing(args.backbone)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, pre.image_size, pre.image_size, 3), dtype=np.uint8)
    model = build_backbone(args.backbone).eval().to(device, memory_format=torch.channels_last)
    batch = pre.apply(images[: args.batch_size]).to(device).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def raw() -> None:
        with reuse_freed_memory():  # as fedtl's pass does (on a CPU it matters: shared/heap.py)
            for _ in range(0, args.images, args.batch_size):
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                    model(batch)

    small = images[:, : args.small_size, : args.small_size]

    def fedtl(inputs: np.ndarray = images) -> None:
        extract_features(model, inputs, pre, batch_size=args.batch_size, device=device, progress=False)

    raw(), fedtl(), fedtl(small)  # warm-up: kernels, allocator
    raw_s, fedtl_s = _best(raw, args.repeats, device), _best(fedtl, args.repeats, device)
    small_s = _best(lambda: fedtl(small), args.repeats, device)
    card = torch.cuda.get_device_name(0) if device == "cuda" else "none (CPU rehearsal)"
    print(f"card: {card}; backbone {args.backbone} at {pre.image_size} px, batch {args.batch_size}")
    print(f"raw {'bf16' if device == 'cuda' else 'float32'} inference: {args.images / raw_s:,.0f} images/s")
    share = 100 * raw_s / fedtl_s
    print(f"fedtl extraction:   {args.images / fedtl_s:,.0f} images/s ({share:.1f}% of raw; target >= 90%)")
    share = 100 * raw_s / small_s
    print(f"  from {args.small_size} px images: {args.images / small_s:,.0f} images/s ({share:.1f}% of raw)")


if __name__ == "__main__":
    main()
