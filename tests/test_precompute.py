"""End-to-end tests of the reference stage: pipeline.precompute, its jobs, resume, fault injection, fingerprints."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from dpo import fingerprint as fpr
from dpo import schema
from dpo.batching import Pairs, collate
from dpo.checkpoint import read_metrics
from dpo.config import load_config
from dpo.errors import UserError
from dpo.forward import PolicyLogps, sequence_logps
from dpo.storage import read_parquet_files
from dpo.launch import DatasetFolder, read_pairs, train
from pipeline import manifest as mf
from pipeline.precompute import precompute
from pipeline.prepare import dataset_folder, find_datasets

pytestmark = pytest.mark.usefixtures("ray_session", "one_torch_thread")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
EVAL = str(EXAMPLES / "eval.jsonl")  # 200 pairs


def make_config(tmp_path: Path, model: str, files=(EVAL,), **overrides):
    base = {"run.output_dir": str(tmp_path / "run"), "model.policy": model, "data.train_files": list(files),
            "data.max_length": 64, "data.max_prompt_length": 32, "data.shard_rows": 50,
            "reference.batch_tokens": 1024, "reference.pairs_per_call": 64}
    base.update(overrides)
    return load_config(None, [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in base.items()])


def scores(cfg, split="train") -> dict[str, tuple[float, float]]:
    folder = dataset_folder(cfg, "reference", split)
    table = read_parquet_files(folder, fpr.read_manifest(folder)["files"])
    rows = table.to_pylist()
    ids = [r["pair_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a pair was written twice"
    return {r["pair_id"]: (r["ref_chosen_logp"], r["ref_rejected_logp"]) for r in rows}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(abs(x - y) for k in a for x, y in zip(a[k], b[k]))


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_model):
    """examples/data/eval.jsonl scored once, cleanly, in 4 shards; eager attention (batch-invariant to the bit)."""
    cfg = make_config(tmp_path_factory.mktemp("clean"), tiny_model, **{"model.attn_implementation": "eager"})
    manifest = precompute(cfg)
    return cfg, manifest, scores(cfg)


# --------------------------------------------------------------------------- the numbers


def test_cached_scores_equal_one_pair_per_forward_on_examples(clean, tiny_model, independent_logp):
    cfg, manifest, _ = clean
    folder = dataset_folder(cfg, "reference", "train")
    rows = read_parquet_files(folder, manifest["files"]).to_pylist()
    assert len(rows) == manifest["counts"]["kept"] == 200
    worst = max(max(abs(r["ref_chosen_logp"] - independent_logp(tiny_model, r["prompt_ids"], r["chosen_ids"])),
                    abs(r["ref_rejected_logp"] - independent_logp(tiny_model, r["prompt_ids"], r["rejected_ids"])))
                for r in rows)
    assert worst < 1e-5
    assert manifest["backend"] == "hf" and manifest["dtype"] == "float32"
    assert manifest["reference_model"] == tiny_model and manifest["fingerprint"]["reference_model"]
    saved = yaml.safe_load(Path(folder, "config.yaml").read_text())
    assert saved["model"]["policy"] == tiny_model


# Real transcripts, long: many pairs are cut to max_length.
HH_LENGTHS = {"data.max_length": 192, "data.max_prompt_length": 128}


@pytest.fixture(scope="module")
def hh_scored(tmp_path_factory, tiny_model, hh_pairs):
    """The first 64 HH pairs scored once: the run folder, the config and the manifest."""
    folder = tmp_path_factory.mktemp("hh")
    cfg = make_config(folder, tiny_model, files=[hh_pairs], **HH_LENGTHS)
    return folder, cfg, precompute(cfg)


@pytest.mark.slow
def test_cached_scores_equal_one_pair_per_forward_on_hh(hh_scored, tiny_model, independent_logp):
    _, cfg, manifest = hh_scored
    c = manifest["counts"]
    assert c["read"] == 64 and c["kept"] + c["rejected"] == 64 and c["kept"] >= 32
    rows = read_parquet_files(dataset_folder(cfg, "reference", "train"), manifest["files"]).to_pylist()
    assert len(rows) == c["kept"]
    for r in rows:
        assert r["ref_chosen_logp"] == pytest.approx(
            independent_logp(tiny_model, r["prompt_ids"], r["chosen_ids"]), abs=1e-5)
        assert r["ref_rejected_logp"] == pytest.approx(
            independent_logp(tiny_model, r["prompt_ids"], r["rejected_ids"]), abs=1e-5)


@pytest.mark.slow
def test_first_step_on_hh_is_ln2_with_policy_as_reference(hh_scored, tiny_model, hh_pairs):
    """Scoring and training agree on real pairs: the policy's log-probs in each of training's layouts are the
    cached reference scores, and training's first step, policy == reference, gives margins 0 and loss ln 2."""
    folder, scored, manifest = hh_scored
    assert manifest["counts"]["kept"] >= 24
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    pairs = Pairs.from_tables([read_parquet_files(dataset_folder(scored, "reference", "train"), manifest["files"])])
    with torch.no_grad():
        for layout in ("padded", "packed", "shared_prompt"):
            inputs = collate(pairs, np.arange(len(pairs)), 0, layout).inputs
            chosen, rejected = sequence_logps(PolicyLogps(model, 1024), inputs, average=False)
            assert np.allclose(chosen.numpy(), pairs.ref_chosen, atol=1e-4, rtol=1e-6)
            assert np.allclose(rejected.numpy(), pairs.ref_rejected, atol=1e-4, rtol=1e-6)
    cfg = make_config(folder, tiny_model, files=[hh_pairs], **HH_LENGTHS, **{
        "train.num_workers": 1, "train.batch_size": 8, "train.max_steps": 1, "train.save_policy": "false",
        "train.loss_type": "sigmoid", "train.cpus_per_worker": 1})
    result = train(cfg, *find_datasets(cfg))
    first = read_metrics(result["metrics_path"])[0]
    assert abs(first["loss"] - math.log(2)) < 1e-4
    assert abs(first["rewards/margins"]) < 1e-4
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4


@pytest.mark.slow
def test_what_the_writer_writes_is_what_training_reads(clean):
    """Each Parquet part holds dpo.schema.REFERENCE's columns with its types (list<int32> ids, float64 scores),
    and training's reader (dpo.launch.read_pairs, then dpo.batching.Pairs) gives back every written row."""
    cfg, manifest, _ = clean
    folder = dataset_folder(cfg, "reference", "train")
    assert len(manifest["files"]) == 4                        # 200 pairs in shards of 50
    for name in manifest["files"]:
        written = pq.read_schema(os.path.join(folder, name)).remove_metadata()
        assert written.equals(schema.REFERENCE), (name, written)
    pairs = Pairs.from_batch(read_pairs(DatasetFolder(folder, manifest)))
    rows = sorted(read_parquet_files(folder, manifest["files"]).to_pylist(), key=lambda r: r[schema.PAIR_ID])
    assert len(pairs) == len(rows) == 200
    for i, row in enumerate(rows):
        assert pairs.pair_ids[i] == row[schema.PAIR_ID]
        assert pairs.prompt[i].tolist() == row[schema.PROMPT_IDS]
        assert pairs.chosen[i].tolist() == row[schema.CHOSEN_IDS]
        assert pairs.rejected[i].tolist() == row[schema.REJECTED_IDS]
        assert (pairs.ref_chosen[i], pairs.ref_rejected[i]) == (row[schema.REF_CHOSEN_LOGP],
                                                                row[schema.REF_REJECTED_LOGP])
        assert pairs.tokens_per_pair[i] == 2 * row[schema.PROMPT_LENGTH] + row[schema.CHOSEN_LENGTH] + row[schema.REJECTED_LENGTH]


# --------------------------------------------------------------------------- resume and faults


@pytest.mark.slow
def test_rerun_after_interruption_scores_only_unfinished_shards(clean, tmp_path, tiny_model):
    """The clean run's folder, as an interrupted run of the same config leaves it (that run itself costs no
    scoring here): the manifest never written and two of its 4 shards never committed."""
    clean_cfg, first, expected = clean
    cfg = make_config(tmp_path, tiny_model, **{"model.attn_implementation": "eager"})
    assert first["written_shards"] == 4
    folder = dataset_folder(cfg, "reference", "train")
    shutil.copytree(dataset_folder(clean_cfg, "reference", "train"), folder)
    os.remove(os.path.join(folder, fpr.MANIFEST))
    for shard in ("0000-000001", "0000-000003"):
        os.remove(os.path.join(folder, mf.SHARDS, f"{shard}.json"))
        os.remove(os.path.join(folder, f"part-{shard}.parquet"))
    second = precompute(cfg)
    assert second["resumed_shards"] == 2 and second["written_shards"] == 2
    assert second["timings"]["pairs_this_run"] == 100
    assert second["counts"]["kept"] == 200
    assert max_diff(scores(cfg), expected) <= 1e-6
    # Complete now: a third run reuses it without scoring anything.
    assert precompute(cfg)["finished_at"] == second["finished_at"]


@pytest.mark.slow
def test_scoring_actor_killed_mid_run_is_restarted_and_scores_match(clean, tmp_path, tiny_model):
    """2 scoring actors on 200 pairs in 4 shards, 7 pairs a call in batches of at most 150 tokens (the clean
    run: 1 actor, 64 pairs a call, 1024 tokens); one dies after its second batch and Ray restarts it. Every
    pair is written once (scores() refuses a pair written twice), by both actors, with the clean run's scores:
    neither the calls' sizes, nor the actor count, nor a restart change a score.
    What this proves (the pool's restart, the shards written once: pipeline.stage) does not depend on the
    backend; vLLM's engine dies and is replaced in tests/test_vllm.py."""
    _, _, expected = clean
    cfg = make_config(tmp_path, tiny_model, **{"model.attn_implementation": "eager", "reference.pairs_per_call": 7,
                                               "reference.batch_tokens": 150, "reference.num_actors": 2,
                                               "reference.cpus_per_actor": 0.5, "debug.fail_scoring_after_batches": 2})
    manifest = precompute(cfg)
    folder = dataset_folder(cfg, "reference", "train")
    assert os.path.exists(os.path.join(folder, "_debug_scoring_failed")), "the actor never died"
    assert manifest["counts"]["kept"] == 200
    assert len(manifest["scored_by"]) >= 2, manifest["scored_by"]
    assert max_diff(scores(cfg), expected) <= 1e-6


# --------------------------------------------------------------------------- refusals


def _other_tokenizer(tmp_path: Path, model: str) -> dict:
    """Same vocabulary, different tokenizer files: tokenizer.json re-serialised."""
    folder = tmp_path / "tok"
    shutil.copytree(model, folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps(data, indent=1))
    return {"model.tokenizer": str(folder)}


def _other_template(tmp_path: Path, model: str) -> dict:
    folder = tmp_path / "tok"
    shutil.copytree(model, folder)
    template = folder / "chat_template.jinja"
    template.write_text(template.read_text() + "{# changed #}")
    return {"model.tokenizer": str(folder)}


def _other_reference(tmp_path: Path, model: str) -> dict:
    from pipeline.models import build_local_model, iter_texts

    other = build_local_model(tmp_path / "ref", iter_texts([str(EXAMPLES / "train.jsonl")]), preset="tiny", seed=1)
    return {"model.reference": other}


def _other_files(tmp_path: Path, model: str) -> dict:
    path = tmp_path / "eval.jsonl"
    path.write_text(Path(EVAL).read_text().replace("Sure", "Yes"))
    return {"data.train_files": [str(path)]}


CHANGES = {
    "reference_model": _other_reference,
    "tokenizer": _other_tokenizer,
    "chat_template": _other_template,
    "max_length": lambda tmp_path, model: {"data.max_length": 80},
    "max_prompt_length": lambda tmp_path, model: {"data.max_prompt_length": 24},
    "truncation": lambda tmp_path, model: {"data.truncation": "keep_start"},
    "input_files": _other_files,
    "tokenization_version": None,
}


@pytest.mark.parametrize("field", list(CHANGES))
def test_a_dataset_with_another_fingerprint_is_refused_naming_the_field(clean, tmp_path, tiny_model, monkeypatch,
                                                                        field):
    cfg, _, _ = clean
    change = CHANGES[field]
    if change is None:
        monkeypatch.setattr("pipeline.precompute.TOKENIZATION_VERSION", "changed")
        overrides = {}
    else:
        overrides = change(tmp_path, tiny_model)
    other = make_config(Path(cfg.run.output_dir).parent, tiny_model, **{"model.attn_implementation": "eager"},
                        **overrides)
    with pytest.raises(fpr.FingerprintMismatch, match=f"field '{field}'"):
        precompute(other)


def test_a_dataset_scored_in_another_dtype_is_refused(clean, tiny_model):
    """The scorer is "backend/dtype" for hf (and "vllm/<build> <version>/dtype" for vLLM) in the fingerprint."""
    cfg, _, _ = clean
    other = make_config(Path(cfg.run.output_dir).parent, tiny_model, **{"model.dtype": "bfloat16"})
    with pytest.raises(fpr.FingerprintMismatch, match="another backend, vLLM build or version, or dtype .*"
                                                      "field 'scorer': dataset has \"hf/float32\", config gives "
                                                      "\"hf/bfloat16\""):
        precompute(other)


def test_input_files_on_an_object_store_are_fingerprinted_by_their_content(tmp_path, monkeypatch):
    """An input file named by URI (file:// here: the same pyarrow filesystem path as s3:// or gs://) is
    hashed by content, as a local path is, to the same value. Swapping a pair's chosen and rejected keeps
    the file's name and byte count, and used to keep its fingerprint (name and size only, so the old scores
    were reused); now the fingerprint differs, and a dataset made from the old file is refused, naming
    data.train_files."""
    monkeypatch.setattr(fpr, "_CACHE", str(tmp_path / "hashes.json"))
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}) + "\n")
    uri = f"file://{data}"
    before = fpr.input_files_hash([uri])
    assert before == fpr.input_files_hash([str(data)]) and before[0]["sha256"] is not None
    stat = data.stat()
    data.write_text(json.dumps({"prompt": "2 + 2 =", "chosen": " 5", "rejected": " 4"}) + "\n")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # a rewrite's mtime, on any clock
    after = fpr.input_files_hash([uri])
    assert after[0]["size"] == before[0]["size"] and after[0]["sha256"] != before[0]["sha256"]
    with pytest.raises(fpr.FingerprintMismatch, match=r"the input files \(data\.train_files\) differ"):
        fpr.check(str(tmp_path), {"input_files": after}, manifest={"fingerprint": {"input_files": before}})


def test_a_model_that_cannot_load_fails_before_scoring(tmp_path, tiny_model):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    cfg = make_config(tmp_path, tiny_model, **{"model.reference": str(broken)})
    with pytest.raises(UserError, match="model.reference: .* is not a readable safetensors file"):
        precompute(cfg)
    assert not os.path.exists(dataset_folder(cfg, "reference", "train"))


# --------------------------------------------------------------------------- the jobs


def _write_config(path: Path, cfg) -> str:
    path.write_text(cfg.to_yaml())
    return str(path)


def test_verify_reference_passes_on_good_scores_and_fails_on_tampered_ones(clean, tmp_path, capsys):
    from jobs import verify_reference

    cfg, manifest, _ = clean
    good = _write_config(tmp_path / "good.yaml", cfg)
    verify_reference.main(["--config", good, "--sample", "16"])
    assert "OK: all 16 pairs" in capsys.readouterr().out

    copy = tmp_path / "copy"
    shutil.copytree(cfg.run.output_dir, copy)
    tampered = cfg.model_copy(deep=True)
    tampered.run.output_dir = str(copy)
    part = copy / "reference" / manifest["files"][0]
    table = pq.read_table(part)
    values = table.column("ref_chosen_logp").to_pylist()
    values[3] += 0.5  # one pair off by half a nat
    pq.write_table(table.set_column(table.schema.get_field_index("ref_chosen_logp"), "ref_chosen_logp",
                                    [values]), part)
    report = tmp_path / "verify.json"
    with pytest.raises(SystemExit) as exit_:
        verify_reference.main(["--config", _write_config(tmp_path / "bad.yaml", tampered), "--sample", "400",
                               "--json", str(report)])
    assert exit_.value.code == 1
    bad_id = table.column("pair_id")[3].as_py()
    assert bad_id in capsys.readouterr().err
    written = json.loads(report.read_text())
    assert written["failed"] == 1 and written["tolerance_per_token"] == 1e-3
    off = [d for d in written["pairs"] if d["pair_id"] == bad_id]
    assert len(off) == 1 and off[0]["chosen_diff"] == pytest.approx(0.5, abs=1e-4)


@pytest.mark.slow
def test_precompute_job_scores_train_and_eval_and_prints_a_summary(tmp_path, tiny_model, capsys):
    from jobs import precompute_reference

    cfg = make_config(tmp_path, tiny_model, **{"data.eval_files": [EVAL], "data.shard_rows": 1000})
    precompute_reference.main(["--config", _write_config(tmp_path / "c.yaml", cfg)])
    out = capsys.readouterr().out
    assert "reference scores (train, hf, float32)" in out and "reference scores (eval, hf, float32)" in out
    assert scores(cfg).keys() == scores(cfg, "eval").keys()
    # One pool scored both splits: its one actor (reference.num_actors=1), where a pool per split had two.
    by_actor = [fpr.read_manifest(dataset_folder(cfg, "reference", split))["scored_by"] for split in ("train", "eval")]
    assert len(set(by_actor[0]) | set(by_actor[1])) == 1, by_actor


def test_an_actor_that_dies_past_its_restart_bound_fails_the_job_in_one_line(tmp_path, tiny_model, capsys):
    """reference.max_restarts=1 and an actor that dies at its first batch, twice (debug.scoring_deaths=2): it
    is started, dies, is restarted once, dies again, and Ray gives it up. Both deaths left their marker (the
    count of restarts, from the run's own record), and the job exits 2 with one line naming the bound, the
    cause, and the keys to change; it used to end in Ray's traceback."""
    from jobs import precompute_reference

    cfg = make_config(tmp_path, tiny_model, **{"debug.fail_scoring_after_batches": 0, "debug.scoring_deaths": 2,
                                               "reference.max_restarts": 1, "reference.pairs_per_call": 4})
    with pytest.raises(SystemExit) as exit_:
        precompute_reference.main(["--config", _write_config(tmp_path / "c.yaml", cfg)])
    assert exit_.value.code == 2
    folder = dataset_folder(cfg, "reference", "train")
    assert sorted(n for n in os.listdir(folder) if n.startswith("_debug_scoring_failed")) == [
        "_debug_scoring_failed", "_debug_scoring_failed.2"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: a scoring actor died 2 times, once more than reference.max_restarts=1 allows "
                              "(The actor is dead because its worker process has died"), err[-1]
    assert "lower reference.batch_tokens" in err[-1] and "raise reference.max_restarts" in err[-1]
    assert not os.path.exists(os.path.join(folder, fpr.MANIFEST))


def test_precompute_job_exits_2_with_one_line_for_a_missing_model(tmp_path, capsys):
    from jobs import precompute_reference

    cfg = make_config(tmp_path, str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit) as exit_:
        precompute_reference.main(["--config", _write_config(tmp_path / "c.yaml", cfg)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]
