"""Checks that the environment really emulates an AVX2-only CPU before tests run as one.

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/emulation_check.py

Prints torch's CPU capability and the measured float32 and bfloat16 matrix-product rates; exits 1
unless the capability is AVX2 and bfloat16 runs at under a quarter of float32's rate (on a real
AVX2-only CPU it runs at a few percent of it; hardware bfloat16 runs faster than float32).
"""

import sys

import torch

from homediff.precision import matmul_rate


def main() -> int:
    capability = torch.backends.cpu.get_cpu_capability()
    fp32, bf16 = (matmul_rate("cpu", dtype, n=256) for dtype in (torch.float32, torch.bfloat16))
    print(f"CPU capability {capability}: float32 {fp32 / 1e9:.1f} GFLOP/s, bfloat16 {bf16 / 1e9:.1f} "
          f"GFLOP/s ({bf16 / fp32:.2f}x)")
    if capability != "AVX2" or bf16 > fp32 / 4:
        print("not an AVX2-only CPU: set ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
