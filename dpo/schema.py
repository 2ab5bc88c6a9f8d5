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

import pyarrow as pa

PAIR_ID = "pair_id"
PROMPT_IDS = "prompt_ids"
CHOSEN_IDS = "chosen_ids"       # the response tokens only, EOS included
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


def dataset_schema(scored: bool) -> pa.Schema:
    """The columns of a reference dataset (scored) or of a prepared one."""
    return REFERENCE if scored else PREPARED
