"""Test-wide setup, done before the first project import:

* TRITON_INTERPRET=1, so Triton kernels (decorated at import) run on the CPU interpreter;
* one CPU thread unless OMP_NUM_THREADS says otherwise. The tests' tiny shapes gain nothing
  from a second thread, and on a machine shared with other jobs an OpenMP team waiting for a
  descheduled thread made them up to 17x slower (a 4.6 s test took 81 s with two busy
  processes beside it; 8 s single-threaded). Tests that check results across thread counts
  set 1 and 2 threads themselves; subprocesses inherit the variable.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # also if torch was imported first


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _verification_cache(tmp_path_factory):
    """First-use backend verdicts go to a folder of this test session, not the user's cache
    (subprocesses inherit it; tests that need an empty cache set their own)."""
    os.environ.setdefault("MGM_FAST_CACHE_DIR", str(tmp_path_factory.mktemp("mgm_fast_cache")))


@pytest.fixture(autouse=True)
def _tf32_off():
    """TF32 off for cuBLAS matmuls and cuDNN convolutions in every test, whatever torch's
    defaults or an earlier test set, and the previous values restored afterwards. A test that
    wants TF32 turns it on itself with monkeypatch (torch.backends.cudnn, "allow_tf32", True)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
