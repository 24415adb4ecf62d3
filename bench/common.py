"""Shared pieces of the benchmark suites: cases, FLOP formulas, peers' names, the timing loop.

Every benchmark is one (case, method) pair. ``benchmark.group`` is the case id, so a group's table
compares every method on identical inputs; ``benchmark.extra_info`` carries what the report needs
(method, the group's torch peer, FLOPs and GFLOP/s, dtype, device, shape, versions).

Timing: ``measure`` warms a call up (torch.compile compiles and Triton autotunes there, outside the
timing), estimates one call, then runs ``benchmark.pedantic`` with as many rounds as fit the time
budget (``--bench-seconds``). A CUDA call is synchronized inside the timed function; calls shorter
than ``min_call_s`` are batched (``iterations``) and synchronized once per batch, and pytest-benchmark
divides by the batch, so every figure is the time of one call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import time
from typing import Callable

import torch

from fastattn.testing import check_relative

# -- names of the methods (rows of a group's table); the report and its targets use these ----------
SDPA = "torch SDPA"
NAIVE = "naive math (fastattn.reference)"
COMPILE_MATH = "torch.compile(math)"
FFN_EAGER = "eager Linear-ReLU-Linear"
FFN_COMPILE = "torch.compile(Linear-ReLU-Linear)"
CUBLAS = "cuBLAS GEMMs (torch.mm x2)"
TEL_EVAL = "nn.TransformerEncoderLayer (eval fast path)"
TEL_TRAIN = "nn.TransformerEncoderLayer"
CLASSIFIER_STOCK = "TextClassifier (stock torch)"


def fastattn_method(backend: str) -> str:
    return f"fastattn[{backend}]"


DTYPE_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


# -- settings, filled in by bench/conftest.py from the command line ---------------------------------
@dataclasses.dataclass
class Settings:
    seconds_cpu: float = 1.0     # timed budget per benchmark on the CPU
    seconds_gpu: float = 0.25    # ... on a GPU
    min_rounds: int = 3
    max_rounds: int = 2000
    warmup: int = 1              # untimed calls in measure(), after the check call that compiled / autotuned
    min_call_s: float = 1e-3     # calls shorter than this are batched per timed round


SETTINGS = Settings()


# -- FLOP formulas: one per op --------------------------------------------------------------------
def attention_flops(N: int, H: int, L: int, S: int, E: int, Ev: int | None = None, *, causal: bool = False,
                    backward: bool = False) -> float:
    """Forward: Q·Kᵀ and P·V, 2·N·H·L·S·(E + Ev) (= 4·N·H·L·S·E), halved for causal; backward 2.5×."""
    Ev = E if Ev is None else Ev
    fwd = 2.0 * N * H * L * S * (E + Ev)
    if causal:
        fwd /= 2.0
    return fwd * (3.5 if backward else 1.0)


def linear_flops(T: int, d_in: int, d_out: int, *, backward: bool = False) -> float:
    """One GEMM x (T, d_in) @ Wᵀ: 2·T·d_in·d_out; backward (dX and dW) 2×."""
    fwd = 2.0 * T * d_in * d_out
    return fwd * (3.0 if backward else 1.0)


def ffn_flops(T: int, D: int, F: int, D2: int | None = None, *, backward: bool = False) -> float:
    """Linear → activation → Linear: 2·T·(D·F + F·D2); backward 2×."""
    D2 = D if D2 is None else D2
    return linear_flops(T, D, F, backward=backward) + linear_flops(T, F, D2, backward=backward)


def encoder_layer_flops(N: int, L: int, D: int, H: int, F: int, *, backward: bool = False) -> float:
    """nn.TransformerEncoderLayer: in-projection (3D), attention, out-projection, feed-forward."""
    T = N * L
    return (linear_flops(T, D, 3 * D, backward=backward) + linear_flops(T, D, D, backward=backward)
            + attention_flops(N, H, L, L, D // H, backward=backward) + ffn_flops(T, D, F, backward=backward))


# -- cases ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """One group: an op on fixed inputs. ``id`` is the group name; ``params`` go to extra_info."""
    device: str          # "cpu" or "cuda"
    op: str              # "attention", "ffn", "encoder_layer", "classifier"
    pass_: str           # "fwd", "fwd+bwd", "eval", "train"
    dtype: torch.dtype
    shape: tuple         # ((name, value), ...) in display order
    variant: str = "none"  # "none", "causal", "kpad50", ...
    family_x: str = ""   # the shape entry that varies along a plot's x axis ("L", "T"); "" = none
    family_skip: tuple = ()  # other shape entries that vary with x (N = tokens / L); left out of family

    def __getitem__(self, name):
        return dict(self.shape)[name]

    @property
    def id(self) -> str:
        dev = "gpu" if self.device == "cuda" else "cpu"
        shape = "-".join(f"{k}{v}" for k, v in self.shape)
        tail = "" if self.variant == "none" else f"/{self.variant}"
        return f"{dev}/{self.op}/{self.pass_}/{DTYPE_SHORT[self.dtype]}/{shape}{tail}"

    @property
    def family(self) -> str:
        """The id without the x-axis entry: cases of one family differ only along x."""
        if not self.family_x:
            return self.id
        dev = "gpu" if self.device == "cuda" else "cpu"
        shape = "-".join(f"{k}{v}" for k, v in self.shape if k != self.family_x and k not in self.family_skip)
        tail = "" if self.variant == "none" else f"/{self.variant}"
        return f"{dev}/{self.op}/{self.pass_}/{DTYPE_SHORT[self.dtype]}/{shape}{tail}"

    @property
    def backward(self) -> bool:
        return self.pass_ in ("fwd+bwd", "train")

    def params(self) -> dict:
        p = {"op": self.op, "pass": self.pass_, "dtype": str(self.dtype).replace("torch.", ""),
             "device_type": self.device, "variant": self.variant, "family": self.family,
             "shape": "-".join(f"{k}{v}" for k, v in self.shape)}
        p.update(dict(self.shape))
        if self.family_x:
            p["x_name"] = self.family_x
            p["x"] = dict(self.shape)[self.family_x]
        return p


# -- the environment --------------------------------------------------------------------------------
def cuda_ok() -> bool:
    return torch.cuda.is_available()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except Exception:  # noqa: BLE001 - absent or broken: the report says "none"
        return None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return cpu_model()


def env_info(device: str) -> dict:
    info = {"torch": torch.__version__, "triton": triton_version(), "device": device,
            "device_name": device_name(device), "threads": torch.get_num_threads()}
    if device == "cuda":
        info["cuda"] = torch.version.cuda
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


# -- fastattn, imported defensively so that peers still run while the package is incomplete -------
_FASTATTN = None
_FASTATTN_ERROR: str | None = None


def fastattn_module():
    """The fastattn package, or None when it does not import (the reason: ``fastattn_error()``)."""
    global _FASTATTN, _FASTATTN_ERROR
    if _FASTATTN is None and _FASTATTN_ERROR is None:
        try:
            import fastattn
            _FASTATTN = fastattn
        except Exception as e:  # noqa: BLE001 - reported in the pytest header, fastattn rows vanish
            _FASTATTN_ERROR = f"{type(e).__name__}: {e}"
    return _FASTATTN


def fastattn_error() -> str | None:
    fastattn_module()
    return _FASTATTN_ERROR


def fastattn_backends(device: str) -> list[str]:
    """The kernel backends that may serve tensors on ``device`` here ("reference" is the naive peer).

    Triton under TRITON_INTERPRET=1 is left out: interpreted kernels are not worth timing.
    FASTATTN_BENCH_BACKENDS="a,b" replaces the wanted list (still only available ones are timed).
    """
    fa = fastattn_module()
    if fa is None:
        return []
    try:
        avail = fa.available_backends()
    except Exception:  # noqa: BLE001
        return []
    wanted = ("cpu",) if device == "cpu" else ("cuda", "triton")
    override = os.environ.get("FASTATTN_BENCH_BACKENDS")   # e.g. "reference" to try the harness
    if override:
        wanted = tuple(b.strip() for b in override.split(",") if b.strip())
    if os.environ.get("TRITON_INTERPRET") == "1":
        wanted = tuple(b for b in wanted if b != "triton")
    return [b for b in avail if b in wanted]


def is_refusal(err: BaseException) -> bool:
    """True when ``err`` is fastattn saying a backend cannot serve a call (not a bug)."""
    fa = fastattn_module()
    cls = getattr(fa, "BackendError", None) if fa is not None else None
    return cls is not None and isinstance(err, cls)


def skip_if_refused(fn: Callable, what: str):
    """Run ``fn`` once; a backend's refusal skips the test with its reasons, anything else fails it."""
    import pytest
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        if is_refusal(e):
            pytest.skip(f"{what} does not serve this case: {e}")
        raise


# -- checks -----------------------------------------------------------------------------------------
def check_close(got, want, dtype: torch.dtype, what: str) -> None:
    """A benchmark of a wrong result means nothing: each tensor within fastattn.testing's relative
    L2 bound of the peer's (``got``/``want``: a tensor or a sequence of tensors, outputs then grads)."""
    check_relative(what, got, want, dtype)


# -- timing -----------------------------------------------------------------------------------------
def _sync(device: str) -> Callable[[], None]:
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def measure(benchmark, fn: Callable[[], object], case: Case, method: str, *, baseline: str, flops: float,
            context: contextlib.AbstractContextManager | None = None, extra: dict | None = None) -> None:
    """Time ``fn`` (one call of ``method`` on ``case``'s inputs) into ``benchmark``, group = case id."""
    sync = _sync(case.device)
    gpu = case.device == "cuda"
    budget = SETTINGS.seconds_gpu if gpu else SETTINGS.seconds_cpu
    benchmark.group = case.id
    info = benchmark.extra_info
    info.update(case.params())
    info.update(env_info(case.device))
    info.update({"method": method, "baseline": baseline, "peer": baseline, "is_baseline": method == baseline,
                 "flops": flops})
    if extra:
        info.update(extra)
    # which implementation ran: a fastattn backend, torch's SDPA backend, or plain torch
    if method.startswith("fastattn["):
        info["backend"] = method[len("fastattn["):-1]
    elif method == NAIVE:
        info["backend"] = "reference"
    else:
        info["backend"] = f"torch:{info['sdpa_backend']}" if "sdpa_backend" in info else "torch"
    with context if context is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        fn()
        sync()
        info["first_call_s"] = time.perf_counter() - t0   # after the correctness check's call
        for _ in range(max(SETTINGS.warmup - 1, 0)):
            fn()
        sync()   # the warm-up calls: this first one and warmup - 1 more
        t0 = time.perf_counter()
        fn()
        sync()
        est = max(time.perf_counter() - t0, 1e-7)
        iterations = 1 if est >= SETTINGS.min_call_s else int(math.ceil(SETTINGS.min_call_s / est))
        rounds = int(budget / (est * iterations))
        rounds = max(SETTINGS.min_rounds, min(SETTINGS.max_rounds, rounds))
        calls = [0]

        def timed():
            fn()
            calls[0] += 1
            if calls[0] % iterations == 0:
                sync()

        info["iterations"] = iterations
        benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=0)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        median = stats.stats.median
        info["median_s"] = median
        info["gflops"] = flops / median / 1e9
        info["tflops"] = flops / median / 1e12


def grads_fn(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor], grad_out: torch.Tensor):
    """A fwd+bwd call: the output and d(inputs) for ``grad_out`` (no .grad accumulation)."""
    def run():
        out = forward()
        grads = torch.autograd.grad(out, inputs, grad_out)
        return (out, *grads)
    return run


def fresh_compile(fn: Callable, **kwargs) -> Callable:
    """torch.compile with static shapes after dropping dynamo's caches (each case compiles anew)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, **kwargs)


class LastCase:
    """Keeps the inputs and expected results of the last case only (cases run in order)."""

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, key, make: Callable):
        if key != self.key:
            self.key, self.value = None, None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.value = make()
            self.key = key
        return self.value


def gpu_memory_fits(nbytes: float, factor: float = 1.5) -> bool:
    free, _ = torch.cuda.mem_get_info()
    return nbytes * factor < free
