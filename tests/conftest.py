import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture(scope="session", autouse=True)
def decoded_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Decoded data sets go to a folder of this session (subprocesses inherit it), never
    to ~/.cache."""
    root = tmp_path_factory.mktemp("decoded")
    os.environ["BAFFLE_DECODED_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {SHARED_MNIST} (../shared beside the repo)")
    return SHARED_MNIST
