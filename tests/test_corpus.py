"""The standard-library corpus: real documents of many lengths, deterministic, split by file."""

import pytest
import torch

from batchlab.workloads.corpus import VOCAB_SIZE, stdlib_corpus


def test_corpus_has_real_documents_of_many_lengths():
    corpus = stdlib_corpus(max_files=60)
    lengths = corpus.lengths("train")
    assert corpus.files == 60
    assert len(lengths) > 200
    assert min(lengths) >= 16
    assert max(lengths) > 20 * sorted(lengths)[len(lengths) // 2]  # a long tail, as real text has
    doc = corpus.train[0]
    assert doc.dtype == torch.long and int(doc.max()) < VOCAB_SIZE
    assert corpus.val, "one file in ten is held out"


def test_corpus_is_deterministic_and_streams():
    a = stdlib_corpus(max_files=20, min_bytes=32)
    b = stdlib_corpus.__wrapped__(max_files=20, min_bytes=32)  # built again, not the cached one
    assert [d.tolist() for d in a.train] == [d.tolist() for d in b.train]
    assert len(a.stream("train")) == sum(a.lengths("train"))


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"max_files": 0}, "max_files must be a positive int or None, got 0")]
)
def test_corpus_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        stdlib_corpus(**kwargs)


def test_split_name_is_checked():
    with pytest.raises(ValueError, match="split must be 'train' or 'val', got 'test'"):
        stdlib_corpus(max_files=5).lengths("test")
