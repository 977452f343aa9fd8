import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
GPU_ON_CPU = "CYCLE_ORACLE_GPU_TESTS_ON_CPU"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip where torch sees no CUDA device (the CPU machines, CI), so the whole
    suite and `pytest -m gpu` report them as skipped, not failed. CYCLE_ORACLE_GPU_TESTS_ON_CPU=1
    runs them on the CPU instead: a dry run of the test code itself (tests/test_gpu.py)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or os.environ.get(GPU_ON_CPU) == "1":
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}); "
                                   f"{GPU_ON_CPU}=1 dry-runs these tests on the CPU")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_path():
    from cycle_oracle.models import resolve_model_path

    return resolve_model_path("tiny-random-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path):
    from cycle_oracle.models import load_tokenizer

    return load_tokenizer(tiny_path)


@pytest.fixture()
def tiny_model(tiny_path):
    import torch

    from cycle_oracle.models import load_causal_lm

    torch.manual_seed(0)
    return load_causal_lm(tiny_path)


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture()
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two spinning OpenMP
    threads per process made generation several times slower; restore the setting afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
