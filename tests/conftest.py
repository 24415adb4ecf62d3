"""Test set-up. Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set
before anything imports triton, so it is set here, first. Nothing here touches a GPU at import."""
import os

if os.environ.get("FASTATTN_TEST_NO_INTERPRET") != "1":
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastattn  # noqa: E402


def backend_device(name: str) -> str:
    """Where a backend's conformance cases run: GPU backends on CUDA when there is one."""
    if name == "cuda":
        return "cuda"
    if name in ("triton", "reference") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def interpreted(name: str) -> bool:
    return name == "triton" and backend_device(name) == "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: one intra-op thread is faster than two and leaves the shared CPU to others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def thread_counts():
    """Run a body under several intra-op thread counts, restoring the caller's count afterwards:
    `for n in thread_counts((1, 2)): ...`."""
    old = torch.get_num_threads()

    def counts(values):
        for n in values:
            torch.set_num_threads(n)
            yield n

    yield counts
    torch.set_num_threads(old)


@pytest.fixture
def tuning_knob():
    """set(name, value): sets one of the C++ kernels' tuning knobs (csrc/tuning.h) for this test and
    restores it afterwards. The knobs are read from the environment once per process, so a test that
    varies one sets it here rather than with monkeypatch.setenv."""
    from fastattn import _C

    old = {}

    def set_knob(name, value):
        prev = _C.set_tuning_knob(name, value)
        old.setdefault(name, prev)

    yield set_knob
    for name, value in old.items():
        _C.set_tuning_knob(name, value)
