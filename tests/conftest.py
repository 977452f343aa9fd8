import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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
