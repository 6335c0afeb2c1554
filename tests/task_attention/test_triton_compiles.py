"""The Triton kernels compile for real GPUs without one (fp32 for sm_80; bf16 with causal, dropout
and the identity rule for sm_90): `triton.compile` down to PTX in a subprocess without
TRITON_INTERPRET (the interpreter does not type-check like the compiler does). Runs where
Triton's CUDA backend (bundled ptxas) is installed."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    import pyops.kernels.task_attention as K

    common = {"QG": "*i32", "KG": "*i32", "ALLOW": "*u8", "QSUM": "*i64", "KSUM": "*i64", "SEED": "*i64"}
    for arch, dt, d, causal, drop, ident in ((80, "fp32", 4, False, False, False), (90, "bf16", 64, True, True, True)):
        bd = max(16, triton.next_power_of_2(d))
        consts = dict(D=d, DV=d, BD=bd, BDV=bd, BM=64, BN=32, CAUSAL=causal, IDENTITY=ident, DROPOUT=drop,
                      UPCAST=False)
        io = dict(Q="*" + dt, K="*" + dt, V="*" + dt, LSE="*fp32", **common)
        for fn, extra in ((K._fwd_kernel, dict(O="*" + dt)),
                          (K._bwd_dkdv_kernel, dict(DO="*" + dt, DELTA="*fp32", DK="*" + dt, DV_="*" + dt)),
                          (K._bwd_dq_kernel, dict(DO="*" + dt, DELTA="*fp32", DQ="*" + dt))):
            types = dict(io, **extra)
            sig = {n: ("constexpr" if n in consts else types.get(n, "fp32" if n in ("scale", "dropout_p") else "i32"))
                   for n in fn.arg_names}
            triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32))
    print("compiled")
''')


@pytest.mark.slow
def test_triton_kernels_compile_for_gpus():
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as exc:
        pytest.skip(f"Triton's CUDA backend is not installed ({type(exc).__name__}: {exc})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
