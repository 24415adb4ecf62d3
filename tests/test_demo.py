"""The main job (python -m fastattn.demo) end to end on tiny settings, and its data."""
import os

import pytest
import torch

from fastattn import data as D
from fastattn import demo

TINY = ["--steps", "4", "--train-size", "64", "--test-size", "32", "--batch-size", "8", "--embedding-dim", "16",
        "--nhead", "2", "--num-layers", "1", "--dim-feedforward", "16", "--no-progress", "--backend", "reference"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (tests/conftest.py)


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def test_demo_synthetic_end_to_end(tmp_path, capsys):
    out = tmp_path / "plots" / "training.png"
    result = demo.main(TINY + ["--out", str(out)])
    text = capsys.readouterr().out
    assert out.exists() and _is_png(out) and out.stat().st_size > 1000
    assert "SYNTHETIC" in text and "speedup" in text and "test accuracy" in text and "bag-of-words" in text
    torch_run, fast_run = result["runs"]
    assert len(torch_run["loss"]) == len(fast_run["loss"]) == 4
    assert torch_run["label"] == "torch.nn" and fast_run["label"].startswith("fastattn")
    # Same initial weights, same batches, no dropout: the two runs do the same arithmetic.
    assert result["max_loss_gap"] < 1e-4, result["max_loss_gap"]
    assert abs(torch_run["final_test_acc"] - fast_run["final_test_acc"]) <= 1 / 32 + 1e-9
    assert result["speedup"] > 0


def _write_review(folder, name, text):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        f.write(text)


@pytest.fixture
def tiny_imdb(tmp_path):
    root = tmp_path / "aclImdb"
    good = ["A great film.<br /><br />I loved it, truly great!", "Wonderful acting and a great story.",
            "Great fun; I'd watch it again.", "Loved every minute, great cast."]
    bad = ["A dull, boring film. I hated it.", "Terrible acting and a boring story.",
           "Boring. Don't bother.", "Awful; I hated every minute."]
    for split in ("train", "test"):
        for i, text in enumerate(good):
            _write_review(root / split / "pos", f"{i}_9.txt", text)
        for i, text in enumerate(bad):
            _write_review(root / split / "neg", f"{i}_2.txt", text)
    (root / "train" / "unsup").mkdir()  # present in the real layout, ignored
    return root


def test_demo_aclimdb_directory(tiny_imdb, tmp_path, capsys):
    out = tmp_path / "imdb.png"
    result = demo.main(TINY[:2] + ["--data", str(tiny_imdb), "--max-len", "12", "--vocab-size", "30",
                                    "--batch-size", "4", "--embedding-dim", "16", "--nhead", "2",
                                    "--dim-feedforward", "16", "--no-progress", "--backend", "reference",
                                    "--out", str(out)])
    text = capsys.readouterr().out
    assert result["data"] == "aclImdb" and "aclImdb reviews" in text and "SYNTHETIC" not in text
    assert _is_png(out)


def test_load_aclimdb_tokens_vocab_and_labels(tiny_imdb):
    data = D.load_aclimdb(str(tiny_imdb), vocab_size=12, max_len=5)
    assert data.vocab[:2] == ["<pad>", "<unk>"] and len(data.vocab) == 12
    assert data.vocab[2] == "great"  # the most frequent training word (5 times)
    assert len(data.train) == len(data.test) == 8
    assert data.train.labels.tolist() == [0.0] * 4 + [1.0] * 4  # neg first, then pos, files sorted
    assert int(data.train.lengths.max()) == 5  # cut to max_len
    first_pos = data.train.tokens[4, : int(data.train.lengths[4])]
    want = [w if w in data.vocab else "<unk>" for w in ["a", "great", "film", "i", "loved"]]
    assert data.decode(first_pos).split() == want


def test_load_aclimdb_missing_folder_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="aclImdb-layout"):
        D.load_aclimdb(str(tmp_path))


def test_tokenize():
    assert D.tokenize("<br />This ISN'T bad... 10/10!") == ["this", "isn't", "bad", "10", "10"]


def test_synthetic_is_deterministic_and_follows_its_rule():
    a = D.make_synthetic(300, 50, seed=3)
    b = D.make_synthetic(300, 50, seed=3)
    c = D.make_synthetic(300, 50, seed=4)
    assert torch.equal(a.train.tokens, b.train.tokens) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.tokens[:, :8], c.train.tokens[:, :8])
    index = {w: i for i, w in enumerate(a.vocab)}
    pos = {index[w] for w in D.POSITIVE_WORDS}
    neg = {index[w] for w in D.NEGATIVE_WORDS}
    not_id = index[D.NEGATION]
    for split in (a.train, a.test):
        for row, length, label in zip(split.tokens, split.lengths, split.labels):
            seq = row[: int(length)].tolist()
            assert all(t != D.PAD for t in seq) and all(t == D.PAD for t in row[int(length):].tolist())
            sentiment = [i for i, t in enumerate(seq) if t in pos or t in neg]
            nots = [i for i, t in enumerate(seq) if t == not_id]
            assert len(sentiment) == 1 and len(nots) == 1, seq
            positive = seq[sentiment[0]] in pos
            negated = nots[0] < sentiment[0]
            assert label == float(positive != negated)
    assert 0.4 < float(a.train.labels.mean()) < 0.6


def test_synthetic_defeats_bag_of_words(tiny_imdb):
    data = D.make_synthetic(2000, 1000, seed=0)
    acc = demo.bag_of_words_baseline(data, steps=200)
    assert 0.44 < acc < 0.56, f"a bag-of-words model reached {acc:.1%}: the task leaks through word counts"
    # the same baseline does learn where words carry the label (so the 50% above means something)
    imdb = D.load_aclimdb(str(tiny_imdb), vocab_size=40, max_len=20)
    assert demo.bag_of_words_baseline(imdb, steps=200) >= 0.75


def test_split_batch_is_sequence_first_with_padding_mask():
    data = D.make_synthetic(20, 5, min_len=4, max_len=9, seed=1)
    idx = torch.tensor([0, 3, 5])
    tokens, mask, labels = data.train.batch(idx)
    lengths = data.train.lengths[idx]
    assert tokens.shape == (int(lengths.max()), 3) and mask.shape == (3, int(lengths.max()))
    assert mask.sum(1).tolist() == (int(lengths.max()) - lengths).tolist()
    assert (tokens.t()[mask] == D.PAD).all() and (tokens.t()[~mask] != D.PAD).all()
    assert torch.equal(labels, data.train.labels[idx])


def test_demo_rejects_bad_options():
    with pytest.raises(SystemExit):
        demo.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--dropout", "1.5"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_demo_on_cuda(tmp_path):
    out = tmp_path / "cuda.png"
    args = [a for a in TINY if a not in ("--backend", "reference")]
    result = demo.main(args + ["--device", "cuda", "--out", str(out)])
    assert _is_png(out) and result["max_loss_gap"] < 1e-3
