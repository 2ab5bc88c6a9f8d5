"""The real HH pairs the benchmarks run on, tokenized by the project's own code."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path
from typing import Optional

from dpo.config import DataConfig
from pipeline.formats import RowError, normalise
from pipeline.tokenize import tokenize_pair

HH = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"


def hh_texts(path: Path = HH, limit: Optional[int] = None) -> list[str]:
    """The transcripts of the first `limit` rows (all by default): each row's chosen, then its rejected."""
    texts = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in itertools.islice(fh, limit):
            row = json.loads(line)
            texts += [row["chosen"], row["rejected"]]
    return texts


def load_pairs(n: int, tokenizer, data: DataConfig, path: Path = HH) -> list[tuple[list[int], list[int], list[int]]]:
    """The first n usable pairs as (prompt_ids, chosen_ids, rejected_ids); rows the pipeline rejects are skipped."""
    pairs = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            try:
                tp = tokenize_pair(normalise(json.loads(line), "implicit", tokenizer), tokenizer, data)
            except RowError:
                continue
            pairs.append((tp.prompt_ids, tp.chosen_ids, tp.rejected_ids))
            if len(pairs) == n:
                break
    return pairs
