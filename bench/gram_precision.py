"""How often the Gram kernel should move its tensor-core partial sum into the fp32 total (PROMOTE).

On an H200 the first `.ci/gpu` run (issue 27) found XᵀX's diagonal, a sum of T positive squares,
low by a relative 5.9e-5 at T = 16384 and 1.28e-3 at T = 262144 when one MMA accumulator ran over
all T rows: an error that grows linearly with T, i.e. a bias, not rounding noise (only the
diagonal failed the checks). The kernel now adds a fresh accumulator into the total every
PROMOTE x BLOCK_K rows (PROMOTE = 0: one accumulator, as before). This measures, per PROMOTE, the diagonal's relative error against fp64,
the worst error over Σ|terms| off the diagonal of the first 512 x 512 block
(`offdiag_excl_diagonal_err_over_sum_abs`; the stored H200 run, bench/results/gpu_h200/
gram_precision.jsonl, predates that: its `offdiag_err_over_sum_abs` covers the whole block,
diagonal included), and the time against cuBLAS, so the default is chosen from numbers. GPU only:

    python bench/gram_precision.py --out OUT.jsonl
"""
from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--promote", default="0,2,4,8,16,32")
    ap.add_argument("--tokens", default="16384,262144")
    ap.add_argument("--d", type=int, default=4096)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gram_precision: needs a CUDA GPU (the bias is the tensor cores')")
    import triton.testing
    from gradmap.ops import backend
    moments = backend.load_kernels().moments
    d, dev = args.d, torch.device("cuda")
    with open(args.out, "a") as f:
        for T in map(int, args.tokens.split(",")):
            g = torch.Generator(device=dev).manual_seed(0)
            x = torch.randn(T, d, device=dev, generator=g).to(torch.bfloat16)
            xd = x.double()
            diag_ref = xd.square().sum(0)
            sub = xd[:, :512]
            off_ref, off_mag = sub.T @ sub, sub.abs().T @ sub.abs()
            off_diag = ~torch.eye(512, dtype=torch.bool, device=dev)
            del sub
            c = torch.zeros(d, d, device=dev)
            cublas_ms = triton.testing.do_bench(lambda: c.add_(x.T @ x))
            for p in map(int, args.promote.split(",")):
                c.zero_()
                try:
                    moments.gram_update(c, x, promote=p)
                except Exception as e:  # a config that does not compile is a result too
                    row = {"T": T, "d": d, "promote": p, "error": f"{type(e).__name__}: {e}"[:300]}
                    print(json.dumps(row), flush=True)
                    f.write(json.dumps(row) + "\n")
                    continue
                diag_err = ((c.diagonal().double() - diag_ref) / diag_ref).abs().max().item()
                bias = ((c.diagonal().double() - diag_ref) / diag_ref).mean().item()
                off = ((c[:512, :512].double() - off_ref).abs() / off_mag)[off_diag].max().item()
                ms = triton.testing.do_bench(lambda: moments.gram_update(c, x, promote=p))
                row = {"T": T, "d": d, "promote": p, "diag_rel_err_max": diag_err, "diag_rel_bias": bias,
                       "offdiag_excl_diagonal_err_over_sum_abs": off, "triton_ms": round(ms, 4),
                       "cublas_bf16_ms": round(cublas_ms, 4), "x_vs_cublas": round(cublas_ms / ms, 3),
                       "device": torch.cuda.get_device_name()}
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")
                f.flush()
            del x, xd, c


if __name__ == "__main__":
    main()
