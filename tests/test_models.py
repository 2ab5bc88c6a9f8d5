import json
import os
from pathlib import Path

import pytest
import torch

from pipeline import models

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "User: What is 2 plus 3?\nAssistant: 2 plus 3 is 5.",
    " leading space, trailing space ",
    "tabs\tand\nnewlines\n\n",
    "Grüße, naïve café — 日本語のテキスト 🎉🙂",
] * 10
TRICKY = ["  two leading spaces", "\n\nHuman: hi\n\nAssistant: hello", "ünïcödé 日本 🎉 x",
          "\t\r\n mixed \u00a0 whitespace", "", " ", "never seen: ξψζ ₿ 𝔘𝔫𝔦"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return models.build_local_model(tmp_path_factory.mktemp("m") / "tiny", TEXTS, "tiny", seed=0)


@pytest.fixture(scope="module")
def tok(tiny):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny)


@pytest.mark.parametrize("text", TRICKY)
def test_tokenizer_round_trips(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token_id not in ids and tok.pad_token_id not in ids  # nothing added around the text


def test_tokenizer_special_tokens(tok):
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id and tok.bos_token is None
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert tok(special)["input_ids"] == [tok.convert_tokens_to_ids(special)]


def test_chat_template_is_chatml(tok):
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n")
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert text.startswith(prompt)  # the prompt is a prefix of the whole conversation


def test_saved_folder_loads_with_auto_classes(tiny, tok):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    files = set(os.listdir(tiny))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", models.MARKER} <= files
    assert not any(f.endswith(".bin") for f in files)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32
    cfg = model.config
    assert cfg.vocab_size == len(tok)
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    gen_eos = model.generation_config.eos_token_id
    assert tok.eos_token_id in (gen_eos if isinstance(gen_eos, list) else [gen_eos])
    assert 5e5 <= sum(p.numel() for p in model.parameters()) <= 2e6
    ids = torch.tensor([tok("What is 2 plus 3?")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def _weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def test_build_is_deterministic_per_seed(tiny, tmp_path):
    again = models.build_local_model(tmp_path / "again", TEXTS, "tiny", seed=0)
    other = models.build_local_model(tmp_path / "other", TEXTS, "tiny", seed=1)
    a, b, c = _weights(tiny), _weights(again), _weights(other)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert Path(tiny, "tokenizer.json").read_text() == Path(again, "tokenizer.json").read_text()


def test_build_is_idempotent(tiny):
    before = {f: os.stat(os.path.join(tiny, f)).st_mtime_ns for f in os.listdir(tiny)}
    assert models.build_local_model(tiny, TEXTS, "tiny", seed=0) == str(tiny)
    assert {f: os.stat(os.path.join(tiny, f)).st_mtime_ns for f in os.listdir(tiny)} == before


def test_build_replaces_a_different_build(tmp_path):
    first = _weights(models.build_local_model(tmp_path / "m", TEXTS, "tiny", seed=0))
    second = _weights(models.build_local_model(tmp_path / "m", TEXTS, "tiny", seed=1))
    assert not all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((tmp_path / "m" / models.MARKER).read_text())["seed"] == 1
    assert not [p for p in os.listdir(tmp_path / "m") if p.startswith(".build-")]


def test_build_refuses_a_folder_it_did_not_build(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not empty"):
        models.build_local_model(tmp_path / "mine", TEXTS, "tiny")
    assert (tmp_path / "mine" / "config.json").read_text() == "{}"
    # a build of ours that died while moving files in is finished by the next call
    (tmp_path / "mine" / models.PARTIAL).touch()
    assert models.build_local_model(tmp_path / "mine", TEXTS, "tiny") == str(tmp_path / "mine")
    assert not (tmp_path / "mine" / models.PARTIAL).exists() and (tmp_path / "mine" / models.MARKER).exists()


def test_concurrent_builds_of_one_folder_agree(tiny, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: models.build_local_model(tmp_path / "m", TEXTS, "tiny"), range(3)))
    assert len(set(paths)) == 1 and (tmp_path / "m" / models.MARKER).exists()
    a, b = _weights(tiny), _weights(paths[0])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_reads_jsonl_and_txt(tmp_path):
    (tmp_path / "a.txt").write_text("plain text line\nanother line\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"prompt": [{"role": "user", "content": "nested"}], "chosen": "yes"}) + "\n\n",
        encoding="utf-8")
    assert list(models.iter_texts([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])) == [
        "plain text line", "another line", "user", "nested", "yes"]
    models.main(["--out", str(tmp_path / "m"), "--preset", "tiny",
                 "--texts", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    assert (tmp_path / "m" / models.MARKER).exists()
    with pytest.raises(SystemExit):
        models.main(["--out", str(tmp_path / "m2"), "--texts", str(tmp_path / "missing.txt")])


def test_quickstart_data_is_well_formed():
    data = ROOT / "examples" / "data"
    splits = {s: [json.loads(line) for line in open(data / f"{s}.jsonl", encoding="utf-8")]
              for s in ("train", "eval")}
    assert 600 <= len(splits["train"]) <= 1500 and 150 <= len(splits["eval"]) <= 200
    for rows in splits.values():
        assert len({r["id"] for r in rows}) == len(rows)
        for r in rows:
            assert set(r) == {"id", "prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"]
    train_prompts = {r["prompt"] for r in splits["train"]}
    assert not any(r["prompt"] in train_prompts for r in splits["eval"])  # held out


def test_quickstart_data_is_the_generators_output(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "examples" / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    make_data.main(["--out", str(tmp_path)])
    for split in ("train", "eval"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (ROOT / "examples" / "data" / f"{split}.jsonl").read_bytes()
