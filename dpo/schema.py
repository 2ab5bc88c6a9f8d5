"""The columns of the prepared and reference datasets: their one owner.

The pipeline writes these columns (pipeline.manifest's shard writer, fed by
pipeline.tokenize and pipeline.scoring) and training reads them
(dpo.launch, dpo.batching); both import the names and Arrow types from
here, so a writer and a reader cannot drift apart. It lives in dpo because
dpo never imports pipeline.

    prepared/    PREPARED: one row per kept pair
    reference/   REFERENCE = PREPARED + SCORES
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

# (prompt ids, chosen ids, rejected ids) of one pair: what both forwards and both scorers take
Triple = tuple[Sequence[int], Sequence[int], Sequence[int]]

PAIR_ID = "pair_id"
PROMPT_IDS = "prompt_ids"
CHOSEN_IDS = "chosen_ids"       # the response tokens only, EOS included (a reply cut to fit: its start, no EOS)
REJECTED_IDS = "rejected_ids"
PROMPT_LENGTH = "prompt_length"
CHOSEN_LENGTH = "chosen_length"
REJECTED_LENGTH = "rejected_length"
TRUNCATED = "truncated"
IDENTICAL = "identical"         # chosen_ids == rejected_ids
FILE = "file"                   # the input file and line the pair came from
LINE = "line"
REF_CHOSEN_LOGP = "ref_chosen_logp"      # sum over the response of log pi_ref(token | all before it)
REF_REJECTED_LOGP = "ref_rejected_logp"
# Not stored: the scoring actor's node and the actor itself, counted per shard into the manifest's `scored_on`
# and `scored_by` (pipeline.manifest), the record of where and by which actors each dataset was scored.
SCORED_ON = "scored_on"
SCORED_BY = "scored_by"
SCORED_WHERE = (SCORED_ON, SCORED_BY)

TOKEN_IDS = pa.list_(pa.int32())

PREPARED = pa.schema([
    (PAIR_ID, pa.string()),
    (PROMPT_IDS, TOKEN_IDS),
    (CHOSEN_IDS, TOKEN_IDS),
    (REJECTED_IDS, TOKEN_IDS),
    (PROMPT_LENGTH, pa.int32()),
    (CHOSEN_LENGTH, pa.int32()),
    (REJECTED_LENGTH, pa.int32()),
    (TRUNCATED, pa.bool_()),
    (IDENTICAL, pa.bool_()),
    (FILE, pa.string()),
    (LINE, pa.int64()),
])
SCORES = pa.schema([(REF_CHOSEN_LOGP, pa.float64()), (REF_REJECTED_LOGP, pa.float64())])
REFERENCE = pa.schema(list(PREPARED) + list(SCORES))

# What training reads of a dataset: the ids, and the scores when the loss needs them.
TOKEN_COLUMNS = [PAIR_ID, PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS]
SCORE_COLUMNS = SCORES.names


EMPTY_PROMPT = ("empty prompt: it has no tokens, so nothing predicts the reply's first token; give the row a prompt, "
                "or use a tokenizer that adds a BOS token")


class EmptyPrompt(ValueError):
    pass


def scored_tokens(prompt_length, reply_length):
    """How many of a reply's tokens are scored: all of them (ints or numpy arrays).

    A token's score is log p(token | every token before it), so the reply's
    first token needs a prompt token before it; with an empty prompt only m - 1
    of m would be scored, and a per-token mean (train.average_logps) over m
    would then differ between the cached reference and the policy. Such a pair
    is refused (EmptyPrompt): pipeline.tokenize rejects the row with
    EMPTY_PROMPT, the forward (dpo.forward.lay_out: the policy, and the hf
    scorer) and the vLLM scorer refuse it, and the loss's lengths
    (dpo.batching.collate) are counted here.
    """
    if (np.asarray(prompt_length) < 1).any():
        raise EmptyPrompt(EMPTY_PROMPT)
    return reply_length


def dataset_schema(scored: bool) -> pa.Schema:
    """The columns of a reference dataset (scored) or of a prepared one."""
    return REFERENCE if scored else PREPARED
