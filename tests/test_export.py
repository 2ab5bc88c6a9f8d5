"""Promise: policy/ written one tensor at a time (dpo.export) is what transformers loads, in one file or in
several with an index, tied embeddings included. (Gathered from FSDP shards in a real run:
tests/test_training.py::test_fsdp_matches_ddp_through_a_failure.)"""

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dpo.export import INDEX, tied_aliases, write_safetensors


def test_one_file_holds_every_tensor_exactly(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    state = model.state_dict()
    assert tied_aliases(model) == set()
    assert write_safetensors(state, str(tmp_path), rank=0) == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    written = load_file(tmp_path / "model.safetensors")
    assert list(written) == list(state)
    assert all(torch.equal(written[k], state[k]) for k in state)
    with safe_open(tmp_path / "model.safetensors", "pt") as fh:
        assert fh.metadata() == {"format": "pt"}


def test_several_files_and_tied_embeddings_load_in_transformers_and_score_the_same(tiny_model, tmp_path):
    """The tiny Llama with its output head tied to the embeddings, in files of at most 300 kB: the head is left
    out (transformers ties it again), every file but one-tensor ones stays under the limit, the index maps
    each tensor to its file, and the loaded model's logits are the original's, bit for bit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert tied_aliases(model) == {"lm_head.weight"}
    state = {k: v for k, v in model.state_dict().items() if k not in tied_aliases(model)}
    limit = 300_000
    files = write_safetensors(state, str(tmp_path), rank=0, file_bytes=limit)
    model.config.save_pretrained(tmp_path)

    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / INDEX).read_text())
    assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for name in files:
        tensors = load_file(tmp_path / name)
        assert all(index["weight_map"][k] == name and torch.equal(t, state[k]) for k, t in tensors.items())
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= limit

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
