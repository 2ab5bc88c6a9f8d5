"""Build small local models (tokenizer + randomly initialised Llama) from text.

No model hub is assumed, so tests, the quickstart and the benchmarks build their
own HF-format folders that transformers and vLLM both load.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

EOS, PAD, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
MARKER = ".raydpo_model.json"  # written last: its presence means the folder is complete
PARTIAL = ".raydpo_model.partial"  # present while files move in: the folder is ours, unfinished
_INIT_LOCK = threading.Lock()  # torch's global RNG is shared by threads

# Qwen2-style ChatML without the default system message, so the rendered prompt
# plus generation prompt is an exact prefix of the rendered conversation.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# vocab_size is an upper bound (a small corpus runs out of merges first); the
# parameter counts below assume the full vocabulary.
PRESETS = {
    # unit tests: 0.6M params, a forward in milliseconds
    "tiny": dict(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=512, max_position_embeddings=256),
    # the quickstart: 1.0M params; DPO (beta 0.1, lr 1e-3..3e-3, 16 pairs a step) on
    # examples/data passes 0.85 held-out reward accuracy within 25-50 steps, ~0.16 s each on one core
    "quickstart": dict(vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                       intermediate_size=344, max_position_embeddings=256),
    # benchmarks: 19M params
    "small": dict(vocab_size=8192, hidden_size=384, num_layers=8, num_heads=6, num_kv_heads=2,
                  intermediate_size=1024, max_position_embeddings=1024),
    # benchmarks at ~100M: 102M params with the full vocabulary (89M in 12 layers, 13M in embeddings and head)
    "medium": dict(vocab_size=8192, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                   intermediate_size=2560, max_position_embeddings=1024),
    # GPU checks (bench/gpu_check.sh): ~350M params with the full vocabulary, Llama-shaped as vLLM serves it
    "gpu": dict(vocab_size=32000, hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=8,
                intermediate_size=2816, max_position_embeddings=1024),
}


def train_tokenizer(texts: Iterable[str], out_dir=None, vocab_size: int = 1024):
    """Byte-level BPE: every string round-trips, and nothing is added around the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only, adds no token
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[EOS, PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes, seen or not
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None, unk_token=None,
        extra_special_tokens=[IM_START, IM_END], add_bos_token=False, add_eos_token=False,
        model_max_length=1 << 30, clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
    return hf


def llama_config(*, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
                 max_position_embeddings, **fields):
    """The LlamaConfig of a preset's sizes (PRESETS' names); `fields`: any other LlamaConfig field."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                       num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                       intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                       **fields)


def build_llama(out_dir, tokenizer, *, hidden_size, num_layers, num_heads, num_kv_heads,
                intermediate_size, max_position_embeddings, seed) -> str:
    """A seeded random LlamaForCausalLM saved (float32, safetensors) beside its tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    eos, pad = tokenizer.convert_tokens_to_ids([EOS, PAD])
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    config = llama_config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False, dtype="float32")
    # fork_rng: seed the init without disturbing the caller's global RNG stream
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    # chat generation should stop at the end of the assistant turn too
    model.generation_config = GenerationConfig(
        bos_token_id=eos, eos_token_id=[eos, im_end], pad_token_id=pad)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return str(out_dir)


def build_local_model(out_dir, texts: Iterable[str], preset: str = "tiny", seed: int = 0,
                      progress_bar: bool = True) -> str:
    """Tokenizer + model in one folder; returns at once if the same build is already there (without importing
    transformers). progress_bar=False turns off transformers' bars, process-wide, before it saves."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    texts = [t for t in texts if t]
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]
    spec = {"preset": preset, "seed": seed, "texts_sha256": digest, **PRESETS[preset]}
    out = Path(out_dir)
    marker = out / MARKER
    if marker.exists():
        try:
            found = json.loads(marker.read_text())
        except (OSError, ValueError):  # vanished or torn by a concurrent rebuild
            found = {}
        if found == spec:
            return str(out)
        # Our own marker proves the folder is a build of ours, so replacing it is safe;
        # a reference dataset scored with the old weights fails its fingerprint check.
        diff = sorted(k for k in spec if found.get(k) != spec[k])
        logging.getLogger(__name__).warning("%s was built with other %s: rebuilding it", out, diff)
        marker.unlink(missing_ok=True)
    elif out.is_dir() and not (out / PARTIAL).exists() and any(
            not p.name.startswith(".build-") for p in out.iterdir()):
        # never write over a folder we did not build (a user's real model, say)
        raise ValueError(f"{out} is not empty and holds no model built by pipeline.models; "
                         f"choose an empty or new folder")
    if not progress_bar:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    params = dict(PRESETS[preset])
    vocab_size = params.pop("vocab_size")
    out.mkdir(parents=True, exist_ok=True)
    # Build aside, then move file by file (atomic renames) and the marker last, so a
    # crash or a concurrent builder never leaves a folder that looks complete but is not.
    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as tmp:
        tokenizer = train_tokenizer(texts, None, vocab_size=vocab_size)
        build_llama(tmp, tokenizer, seed=seed, **params)
        (out / PARTIAL).touch()
        for f in sorted(Path(tmp).iterdir()):
            os.replace(f, out / f.name)
        Path(tmp, MARKER).write_text(json.dumps(spec, indent=1))
        os.replace(Path(tmp, MARKER), marker)
        (out / PARTIAL).unlink(missing_ok=True)
    return str(out)


def iter_texts(paths: Iterable[str]) -> Iterator[str]:
    """Every string in .txt lines or (nested) .json/.jsonl values: prompts, replies, contents."""
    def strings(v):
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            for x in v.values():
                yield from strings(x)
        elif isinstance(v, list):
            for x in v:
                yield from strings(x)

    for p in map(str, paths):
        with open(p, encoding="utf-8") as fh:
            if p.endswith(".json"):
                yield from strings(json.load(fh))
                continue
            for line in fh:
                if not p.endswith(".jsonl"):
                    yield line.rstrip("\n")
                elif line.strip():
                    yield from strings(json.loads(line))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.models", description=__doc__)
    ap.add_argument("--out", required=True, help="folder for model + tokenizer")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--texts", nargs="+", required=True, help=".jsonl or .txt files")
    args = ap.parse_args(argv)
    missing = [p for p in args.texts if not os.path.isfile(p)]
    if missing:
        ap.error(f"text file(s) not found: {', '.join(missing)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        texts = list(iter_texts(args.texts))
    except (ValueError, UnicodeDecodeError) as e:  # bad JSON or not UTF-8
        ap.error(f"cannot read the text files: {e}")
    print(build_local_model(args.out, texts, args.preset, args.seed))


if __name__ == "__main__":
    main()
