"""The edges where a run could be silently wrong (issue 25): each is refused, counted or said."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest
import torch

from dpo import schema
from dpo.batching import Pairs, collate
from dpo.config import DataConfig, TrainConfig
from dpo.forward import PolicyLogps, lay_out, sequence_logps
from dpo.train_loop import micro_batch_losses
from pipeline.read import read_file_rows
from pipeline.tokenize import tokenize_batch
from wordlevel import save_wordlevel

LAYOUTS = ["padded", "packed", "shared_prompt"]


def tokenized_rows(path: str, tokenizer: str, data: DataConfig) -> list[dict]:
    """Every row of one file as the pipeline's read and tokenize stages leave it (no Ray)."""
    rows = [row for shard in read_file_rows(path, 0, fmt="auto", shard_rows=1000) for row in shard]
    return tokenize_batch(pa.Table.from_pylist(rows), data=data, tokenizer_path=tokenizer,
                          trust_remote_code=False).to_pylist()


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_an_empty_prompt_is_rejected_with_its_reason_and_refused_by_every_scorer(tmp_path):
    """The word-level tokenizer adds no BOS: prompt "" has no tokens, so nothing predicts a reply's first token.

    Line 1 (prompt "") is rejected with EMPTY_PROMPT; line 2 is kept as prompt [6] (hi), chosen [7, 1]
    (hello <eos>), rejected [8, 1] (bye <eos>): in 2 = kept 1 + rejected 1. The forward (policy and hf
    scorer) refuses such a pair in every layout; the vLLM scorer's refusal is in tests/test_scoring.py.
    """
    tok = save_wordlevel(tmp_path / "tok")
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "", "chosen": "hi", "rejected": "bye"},
                                                  {"prompt": "hi", "chosen": "hello", "rejected": "bye"}])
    rows = tokenized_rows(path, tok, DataConfig(max_length=16, max_prompt_length=8))
    assert [r["reject"] for r in rows] == [schema.EMPTY_PROMPT, None]
    kept = rows[1]
    assert (kept["prompt_ids"], kept["chosen_ids"], kept["rejected_ids"]) == ([6], [7, 1], [8, 1])
    for layout in LAYOUTS:
        with pytest.raises(schema.EmptyPrompt, match="empty prompt"):
            lay_out([([], [7, 1], [8, 1])], pad_id=0, layout=layout)


def test_with_policy_equal_to_reference_the_first_loss_is_ln2_per_token_too(tmp_path, tiny_model, one_torch_thread):
    """Policy = reference: every pair's DPO loss is -log sigmoid(0) = ln 2 = 0.693147, summed or averaged.

    The data holds two pairs with prompt "" (the tiny model's tokenizer adds no BOS) among three good ones.
    Kept as they once were, such a pair scored m - 1 of its m reply tokens while the cached sum was divided
    by m under train.average_logps, and their first losses came out 0.6747 and 0.7706, not ln 2. Now they are
    rejected (5 in = 3 kept + 2 rejected), and the cache (the hf scorer), the policy forward and the loss
    count the same tokens.
    """
    from transformers import AutoModelForCausalLM

    from pipeline.hf_scorer import HFScorer

    records = [{"prompt": "", "chosen": "Paris is the capital.", "rejected": "No idea."},
               {"prompt": "", "chosen": "Yes", "rejected": "It is not so, I think."},
               {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5, or so."},
               {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A number."},
               {"prompt": "Hi", "chosen": "Hello there, friend.", "rejected": "Go."}]
    rows = tokenized_rows(write_jsonl(tmp_path / "pairs.jsonl", records), tiny_model,
                          DataConfig(max_length=64, max_prompt_length=32))
    kept = [r for r in rows if r["reject"] is None]
    triples = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in kept]
    ref = HFScorer(tiny_model).score(triples)
    pairs = Pairs.from_tables(pa.table({
        "pair_id": [r["pair_id"] for r in kept], "prompt_ids": [t[0] for t in triples],
        "chosen_ids": [t[1] for t in triples], "rejected_ids": [t[2] for t in triples],
        "ref_chosen_logp": [s[0] for s in ref], "ref_rejected_logp": [s[1] for s in ref]}))
    policy = PolicyLogps(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval(), 1024)
    for average in (False, True):
        for layout in LAYOUTS:
            mb = collate(pairs, torch.arange(len(pairs)).numpy(), 0, layout)
            with torch.no_grad():
                chosen, rejected = sequence_logps(policy, mb.inputs, average=average)
            out = micro_batch_losses(TrainConfig(average_logps=average), chosen, rejected, mb)
            assert out.losses.tolist() == pytest.approx([math.log(2)] * len(kept), abs=1e-5), (average, layout)
    assert [r["reject"] for r in rows] == [schema.EMPTY_PROMPT] * 2 + [None] * 3


def shard_rows(shard: str, lines: list[int]) -> pa.Table:
    """Tokenized rows of `shard` as the stream delivers them: pair (prompt [5], chosen [6, 1], rejected [7, 1])."""
    return pa.Table.from_pylist([
        {schema.PAIR_ID: f"p{line}", schema.PROMPT_IDS: [5], schema.CHOSEN_IDS: [6, 1], schema.REJECTED_IDS: [7, 1],
         schema.PROMPT_LENGTH: 1, schema.CHOSEN_LENGTH: 2, schema.REJECTED_LENGTH: 2, schema.TRUNCATED: False,
         schema.IDENTICAL: False, schema.FILE: "in.jsonl", schema.LINE: line, "shard": shard, "reject": None}
        for line in lines])


def test_a_row_delivered_again_after_its_shard_committed_is_dropped_and_counted(tmp_path):
    """Shard a holds lines 1-2, shard b line 3. Lines 1, 2 commit a; a retried task then delivers 2 again
    (after a's commit: it used to reopen a, and the stage failed with "incomplete shards" once all was done)
    and 3 twice (before b's commit). Both shards are written once, each with its rows once: a 2, b 1;
    nothing is pending, and the 2 rows delivered again are counted."""
    from pipeline.manifest import SHARDS, ShardWriter

    writer = ShardWriter(str(tmp_path), {"a": 2, "b": 1}, scored=False)
    writer.add(shard_rows("a", [1, 2]))
    writer.add(shard_rows("a", [2]))
    writer.add(pa.concat_tables([shard_rows("b", [3]), shard_rows("b", [3])]))
    assert writer.incomplete() == {} and writer.committed == 2 and writer.redelivered == 2
    markers = {s: json.loads((tmp_path / SHARDS / f"{s}.json").read_text()) for s in "ab"}
    assert {s: (m["rows"], m["kept"]) for s, m in markers.items()} == {"a": (2, 2), "b": (1, 1)}
    assert writer.rows_in == 3


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]", None])
def test_an_unreadable_tokenizer_config_fails_naming_the_file(tmp_path, content):
    """A tokenizer_config.json that is not JSON, not UTF-8, not an object, or not a file (a folder of that name)
    used to be skipped, and the fingerprint then hashed an empty chat template. Now one line names the key
    and the file. Without the file there is no template to hash: that is not an error."""
    from dpo.errors import UserError
    from dpo.fingerprint import tokenizer_hashes

    folder = tmp_path / "tok"
    save_wordlevel(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = folder / "tokenizer_config.json"
    config.unlink()
    tokenizer_hashes(str(folder))
    config.mkdir() if content is None else config.write_bytes(content)
    with pytest.raises(UserError, match=f"^model.tokenizer: cannot read {config} ") as err:
        tokenizer_hashes(str(folder))
    assert "\n" not in str(err.value)


class StallAfter:
    """A StallWatch whose stall is declared on its second empty poll (0.2 s apart)."""

    poll_s = 0.2

    def __init__(self):
        self.polls = 0

    def progressed(self):
        pass

    def check(self):
        from dpo.errors import UserError

        self.polls += 1
        if self.polls == 2:
            raise UserError("run.stall_timeout_s: stalled")


def test_after_a_stall_the_reader_thread_and_its_stream_are_stopped(ray_session):
    """A stream whose one task never returns (it holds 1 of the session's 2 CPUs) stalls. Once the stall
    fails the stage, its reader thread has ended and the stream's task is gone, giving its CPU back:
    they used to run on until the process ended."""
    import threading
    import time

    import ray

    from dpo.errors import UserError
    from pipeline.stage import STREAM_THREAD, watched_batches

    def hang(batch):  # local, so that Ray pickles it by value: workers cannot import this test module
        time.sleep(3600)
        return batch

    total = ray.cluster_resources()["CPU"]
    ds = ray.data.range(1, override_num_blocks=1).map_batches(hang, num_cpus=1)
    with pytest.raises(UserError, match="stalled"):
        for _ in watched_batches(ds, StallAfter()):
            pass
    assert not [t for t in threading.enumerate() if t.name == STREAM_THREAD]
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == total


def test_both_warmups_are_refused_naming_both_keys():
    """train.warmup_steps used to win over train.warmup_ratio without a word; set together they are refused
    in one line naming both. Either alone loads."""
    from dpo.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.warmup_steps=10", "train.warmup_ratio=0.1"])
    assert str(err.value).startswith("train.warmup_steps=10 and train.warmup_ratio=0.1 both set the warmup; set one")
    assert "\n" not in str(err.value)
    assert load_config(None, ["train.warmup_steps=10"]).train.warmup_steps == 10
    assert load_config(None, ["train.warmup_ratio=0.1"]).train.warmup_ratio == 0.1


def test_max_steps_capped_by_the_epochs_is_said():
    """20 steps an epoch, train.epochs=2: 40 steps at most. max_steps 50 is capped at 40, and one line says
    so; 30 runs 30, and no max_steps runs the 40, without a word."""
    from dpo.schedule import training_steps

    assert training_steps(TrainConfig(max_steps=50, epochs=2), 20) == (
        40, "train.max_steps=50 is capped at 40 steps by train.epochs=2 (20 steps an epoch); raise train.epochs "
            "to train longer")
    assert training_steps(TrainConfig(max_steps=30, epochs=2), 20) == (30, None)
    assert training_steps(TrainConfig(epochs=2), 20) == (40, None)


def test_a_resume_over_another_horizon_says_so_and_follows_the_changed_horizons_curve():
    """Linear decay, learning rate 1e-3, 2 warmup steps; 6 steps done of 10, resumed with 20.

    The factor of 0-based step s after warmup is 1 - (s - 2) / (total - 2). Step 7 (s = 6): 1 - 4/8 = 0.5 of
    the old curve, 5e-4; 1 - 4/18 = 7/9 of the new one, 7.77778e-4. The restored optimizer holds the old
    5e-4, which step 7 used to train at; now it takes the new curve's, and step 8 (s = 7) 1 - 5/18 = 13/18.
    Resumed over the same 10 steps: the restored scheduler, 5e-4, and no line.
    """
    from dpo.schedule import lr_schedule, resumed_schedule

    t = TrainConfig(learning_rate=1e-3, lr_scheduler="linear", warmup_steps=2)

    def restored(total: int):
        """An optimizer and scheduler over `total` steps, with the state of 6 steps over 10."""
        states = []
        for horizon in (10, total):
            param = torch.nn.Parameter(torch.zeros(1))
            optimizer = torch.optim.AdamW([param], lr=t.learning_rate)
            states.append((optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(t, horizon))))
        (old_optimizer, old_scheduler), (optimizer, scheduler) = states
        for _ in range(6):
            old_optimizer.step()
            old_scheduler.step()
        optimizer.load_state_dict(old_optimizer.state_dict())
        scheduler.load_state_dict(old_scheduler.state_dict())
        return optimizer, scheduler

    optimizer, scheduler = restored(10)
    assert resumed_schedule(t, optimizer, scheduler, 10, 10, 6) == (scheduler, None)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4, rel=1e-12)

    optimizer, scheduler = restored(20)
    scheduler, line = resumed_schedule(t, optimizer, scheduler, 10, 20, 6)
    assert line == ("resuming after step 6 with an LR schedule over 20 steps instead of 10 (train.max_steps or "
                    "train.epochs changed): step 7's learning rate is 0.000777778, not 0.0005")
    assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0] == pytest.approx(1e-3 * 7 / 9, rel=1e-12)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 13 / 18, rel=1e-12)


def _port(listening: bool):
    """A TCP port on every interface with a listener on it, or one that nothing listens on: (port, socket)."""
    import socket

    sock = socket.socket()
    sock.bind(("", 0))
    port = sock.getsockname()[1]
    if listening:
        sock.listen()
        return port, sock
    sock.close()
    return port, None


def test_a_dead_ray_address_fails_fast_naming_it_and_the_fix(monkeypatch):
    """RAY_ADDRESS names a port nothing listens on: refused in one line, in well under 30 s (Ray retried it
    forever). Ray canonicalises 127.0.0.1 to this node's IP, so the line names the port as given and as tried."""
    import time

    from dpo.errors import UserError
    from jobs.cli import ray_address

    port, _ = _port(listening=False)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(UserError) as err:
        ray_address()
    assert time.monotonic() - started < 30
    line = str(err.value)
    assert line.startswith(f"RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers at ") and f":{port};" in line
    assert line.endswith("; start it, or unset RAY_ADDRESS (or set RAY_ADDRESS=local) to run on a local Ray")


def test_a_dead_recorded_cluster_is_passed_over_for_a_local_ray_and_said(monkeypatch, tmp_path, caplog):
    """No RAY_ADDRESS; Ray's temp dir (RAY_TMPDIR) records the address of the last `ray start`. Dead: the job
    starts a local Ray ("local") and one warning names the address. Alive (something listens there): Ray's
    own choice stands (None), and it joins that cluster as before."""
    from jobs.cli import ray_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    record = tmp_path / "ray" / "ray_current_cluster"
    port, _ = _port(listening=False)
    record.write_text(f"127.0.0.1:{port}")
    with caplog.at_level("WARNING", logger="raydpo"):
        assert ray_address() == "local"
    [warning] = [r.getMessage() for r in caplog.records if r.name == "raydpo"]
    assert f":{port}, where the last `ray start` on this machine left one" in warning and "`ray stop`" in warning
    port, listener = _port(listening=True)
    record.write_text(f"127.0.0.1:{port}")
    try:
        assert ray_address() is None
    finally:
        listener.close()
