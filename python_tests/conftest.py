"""Shared test set-up. No GPU is queried at import beyond `torch.cuda.is_available()`."""

import os
import zlib

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    # Triton kernels run through the CPU interpreter where there is no GPU; it must be
    # chosen before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
        if "sm90" in item.keywords and (not HAS_GPU or torch.cuda.get_device_capability() < (9, 0)):
            item.add_marker(pytest.mark.skip(reason="needs an sm_90 GPU"))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh inputs per test, reproducible from the test id: crc32, not hash(), whose value for a
    # str changes with every interpreter (PYTHONHASHSEED). BSA_TEST_SEED=n draws another set of
    # inputs for every test (to look for rare failures: loop n over a range).
    base = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed((base ^ int(os.environ.get("BSA_TEST_SEED", "0"))) % (2**31))


@pytest.fixture(params=["sm90", "sm80", "sm80-1buf"])
def kernel_family(request, monkeypatch):
    """Runs a CUDA test on both kernel families where the GPU has both (the binding reads
    BSA_DISABLE_SM90 at each call; on other GPUs only the sm80 family exists), and on the sm80
    family's one-buffer variant (64-key forward, dq), which a GPU with an H100's shared memory
    would not pick by itself. Opt in with ``pytest.mark.usefixtures("kernel_family")``."""
    family = request.param
    if family == "sm90":
        if torch.cuda.get_device_capability()[0] != 9:
            pytest.skip("the sm90 family needs an sm_90 GPU")
        monkeypatch.delenv("BSA_DISABLE_SM90", raising=False)
    else:
        monkeypatch.setenv("BSA_DISABLE_SM90", "1")
    # The sm80 64-key forward and dq kernel have a one-buffer and a two-buffer K/V variant (the
    # binding reads BSA_SM80_KV_BUFFERS at each call; unset, the device's shared memory picks).
    if family == "sm80-1buf":
        monkeypatch.setenv("BSA_SM80_KV_BUFFERS", "1")
    elif family == "sm80":
        monkeypatch.setenv("BSA_SM80_KV_BUFFERS", "2")
    else:
        monkeypatch.delenv("BSA_SM80_KV_BUFFERS", raising=False)
    return family
