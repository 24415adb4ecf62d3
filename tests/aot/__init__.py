"""Ahead-of-time compilation of fastattn's Triton kernels for sm_80 and sm_90 without a GPU or a driver.

triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)) runs the whole pipeline down to a
cubin with the ptxas of the triton wheel; the cubin's resource usage (cuobjdump of the same wheel)
gives registers and the stack frame (a Triton kernel makes no calls and has no local arrays, so any
stack is spilled registers), the compiled metadata the shared memory.

    python -m aot.attention [--filter fwd] [--jobs N] [--json out.json]   (from tests/)
    python -m aot.ffn [--filter dh] [--jobs N] [--json out.json]

Each prints one JSON line per compiled kernel and, first, {"triton": version, "jobs": count}. The
triton version is whichever the interpreter imports: tests/test_triton_aot.py runs each sweep once
with this environment's triton and once with PYTHONPATH=.triton36 (triton 3.6.0, the GPU machines').
TRITON_INTERPRET must be unset (under the interpreter triton.jit gives functions that cannot be
compiled); the modules refuse to run with it.
"""
