"""Compiles every Triton kernel for a Hopper GPU (sm_90) and prints {case: shared bytes or error} as JSON.

Run by tests/test_gpu_compile.py in a subprocess, because the test session itself runs Triton in
interpreter mode, where kernels are plain Python and are never compiled.
"""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "compile with TRITON_INTERPRET unset"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import triton_attention as ta  # noqa: E402

FLOAT_ARGS = {"qk_scale", "softmax_scale"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compile_for_sm90(kernel, pointer_dtypes, constants, num_warps, num_stages):
    fn = kernel if isinstance(kernel, JITFunction) else kernel.fn  # the JITFunction behind an autotuner
    signature = {name: "constexpr" if name in constants else
                 "*" + pointer_dtypes[name] if name in pointer_dtypes else
                 "fp32" if name in FLOAT_ARGS else "i32" for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def cases():
    """(name, kernel, pointer dtypes, constexprs, warps, stages): the largest tile of each autotune
    space for 16-bit inputs, the float32 config, and the delta preprocessing. Each attention kernel is
    compiled as launched for batched input (``Table=None``) and for packed sequences ("-varlen": an
    int32 pair table)."""
    for dtype, headdim in (("bf16", 128), ("fp16", 96), ("fp32", 64)):
        precision = ta._dot_precision(DTYPES[dtype])
        io = dict(Q=dtype, K=dtype, V=dtype)
        kernels = {
            "fwd": (ta._fwd_kernel, dict(io, Out=dtype, Lse="fp32"), (128, 128)),
            "dkdv": (ta._bwd_dkdv, dict(io, DO=dtype, Lse="fp32", Delta="fp32", DK="fp32", DV="fp32"), (64, 128)),
            "dq": (ta._bwd_dq, dict(io, DO=dtype, Lse="fp32", Delta="fp32", DQ="fp32"), (128, 64)),
        }
        for name, (kernel, pointers, (block_m, block_n)) in kernels.items():
            warps, stages = 8, 3
            if precision == "ieee":
                config = ta._IEEE_CONFIG
                block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
                warps, stages = config.num_warps, config.num_stages
            constants = dict(HEAD_DIM=headdim, BLOCK_D=triton.next_power_of_2(headdim), PRECISION=precision,
                             BLOCK_M=block_m, BLOCK_N=block_n)
            yield (f"{name}-{dtype}-hd{headdim}", kernel, pointers, dict(constants, Table=None, VARLEN=False),
                   warps, stages)
            yield (f"{name}-varlen-{dtype}-hd{headdim}", kernel, dict(pointers, Table="i32"),
                   dict(constants, VARLEN=True), warps, stages)
    yield ("preprocess-bf16-hd128", ta._bwd_preprocess, dict(Out="bf16", DOut="bf16", Delta="fp32"),
           dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=64), 4, 1)


def main():
    results = {}
    for name, kernel, pointers, constants, warps, stages in cases():
        try:
            results[name] = compile_for_sm90(kernel, pointers, constants, warps, stages).metadata.shared
        except Exception as error:  # reported per case by the test
            results[name] = f"{type(error).__name__}: {error}"
    print(json.dumps(results))


if __name__ == "__main__":
    main()
