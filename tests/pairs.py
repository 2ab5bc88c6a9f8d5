"""Token-id pairs exactly as the pipeline makes them, for tests that run models on real data."""

from __future__ import annotations

import gzip
import json

from pipeline.formats import RowError, normalise
from pipeline.tokenize import load_tokenizer, tokenize_pair


def tokenized(path, fmt: str, model: str, data, limit: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids as the pipeline makes them; rows it rejects are left out."""
    tok = load_tokenizer(model)
    out = []
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            try:
                tp = tokenize_pair(normalise(json.loads(line), fmt, tok), tok, data)
            except RowError:
                continue
            out.append((tp.prompt_ids, tp.chosen_ids, tp.rejected_ids))
            if len(out) == limit:
                break
    return out
