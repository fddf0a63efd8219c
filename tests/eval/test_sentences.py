"""lowbit.data.sentences: real sentences for the embedding-similarity evaluation."""
import pytest

from lowbit import data
from _helpers import shared_data


def test_wikitext2_sentences():
    every = data.sentences()
    assert len(every) > 5000
    assert every[0] == "Robert Boulter is an English film, television and theatre actor."
    picked = data.sentences(64)
    assert picked == data.sentences(64)                      # deterministic
    assert len(picked) == 64 and len(set(picked)) == 64
    assert picked == [every[i * len(every) // 64] for i in range(64)]   # spread over the file
    for s in every:
        assert 6 <= len(s.split()) <= 64
        assert not (s.startswith("=") and s.endswith("=")), s           # no headings
        assert "@" not in s and " ," not in s and " ." not in s, s      # detokenized
    assert "Stevens' father, Mark, is an orthopedic surgeon in Indianapolis and former Indiana Hoosiers football player." in every


def test_text_file_source():
    path = shared_data("text", "other", "sotu_state_of_the_union.txt")
    s = data.sentences(10, source=path, min_words=4)
    assert len(s) == 10 and all(4 <= len(x.split()) <= 64 for x in s)
    assert all(x[-1] in ".!?\"')" for x in s[:5]), s


def test_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="fewer than n=100000"):
        data.sentences(100000)
    with pytest.raises(ValueError, match="n must be positive"):
        data.sentences(0)
    with pytest.raises(FileNotFoundError, match="source must be 'wikitext2' or a text file"):
        data.sentences(5, source="wikitext103")
    monkeypatch.setenv("LOWBIT_SHARED_DATA", str(tmp_path))
    assert data.shared_data_dir() == tmp_path
