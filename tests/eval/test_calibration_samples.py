"""lowbit.data.calibration_samples: seeded token windows from a file or strings."""
import pytest
import torch

from lowbit import data
from _helpers import shared_data, stories260k


@pytest.fixture(scope="module")
def tok():
    return stories260k()[1]


def test_shape_seed_and_content(tok):
    path = shared_data("text", "other", "tinyshakespeare_input.txt")
    a = data.calibration_samples(tok, path, n_samples=16, seqlen=64, seed=3)
    b = data.calibration_samples(tok, path, n_samples=16, seqlen=64, seed=3)
    c = data.calibration_samples(tok, path, n_samples=16, seqlen=64, seed=4)
    assert a.shape == (16, 64) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Each sample is a contiguous window of the tokenized text.
    ids = tok(path.read_text(), return_tensors="pt").input_ids[0]
    first = a[0]
    starts = (ids == first[0]).nonzero().flatten().tolist()
    assert any(torch.equal(ids[s : s + 64], first) for s in starts)


def test_list_of_strings(tok):
    texts = ["Once upon a time there was a cat.", "The cat liked to sleep in the sun all day long."] * 20
    s = data.calibration_samples(tok, texts, n_samples=4, seqlen=32, seed=0)
    assert s.shape == (4, 32)


def test_errors(tok):
    with pytest.raises(ValueError, match="fewer than seqlen=4096"):
        data.calibration_samples(tok, ["a short text"], n_samples=2, seqlen=4096)
    with pytest.raises(FileNotFoundError, match="not found"):
        data.calibration_samples(tok, "/no/such/file.txt", n_samples=2, seqlen=8)
    with pytest.raises(ValueError, match="n_samples must be positive"):
        data.calibration_samples(tok, ["x"], n_samples=0, seqlen=8)
