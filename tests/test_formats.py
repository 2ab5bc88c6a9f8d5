"""Formats, tokenization and truncation, checked against ids worked out by hand.

The word-level tokenizer in tests/wordlevel.py maps each word to a fixed id
(what=9 is=10 2=11 +=12 4=13 5=14 ?=15 <eos>=1 ...), so every expected list
below can be read off its input.
"""

import pytest

from dpo.config import DataConfig
from pipeline.formats import RowError, normalise
from pipeline.read import detect_format, pair_id_of
from pipeline.tokenize import load_tokenizer, tokenize_pair
from wordlevel import save_wordlevel


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(save_wordlevel(tmp_path_factory.mktemp("wordlevel")))


def ids(record, tok, fmt=None, **data):
    data = DataConfig(**{"max_length": 64, "max_prompt_length": 32, **data})
    tp = tokenize_pair(normalise(record, fmt or detect_format(record), tok), tok, data)
    return tp.prompt_ids, tp.chosen_ids, tp.rejected_ids, tp.truncated


EXPLICIT = {"prompt": "what is 2 + 2 ?", "chosen": "4", "rejected": "5"}


def test_explicit(tok):
    """prompt 'what is 2 + 2 ?' -> [9, 10, 11, 12, 11, 15]; replies '4' -> [13, eos=1], '5' -> [14, 1]."""
    assert ids(EXPLICIT, tok) == ([9, 10, 11, 12, 11, 15], [13, 1], [14, 1], False)


def test_implicit_hh(tok):
    """'\\n\\nHuman: hi\\n\\nAssistant:' is the shared prompt -> [3, 4, 6, 5, 4]; ' hello' -> [7, 1]; ' bye' -> [8, 1]."""
    record = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: bye"}
    assert detect_format(record) == "implicit"
    assert ids(record, tok) == ([3, 4, 6, 5, 4], [7, 1], [8, 1], False)


def test_conversational_chat_template(tok):
    """The template renders the prompt as '<|im_start|>user what is 2 + 2 ?<|im_end|> <|im_start|>assistant '
    -> [16, 18, 9, 10, 11, 12, 11, 15, 17, 16, 19]; the chosen conversation adds '4<|im_end|> ' -> [13, 17] + eos."""
    record = {"prompt": [{"role": "user", "content": "what is 2 + 2 ?"}],
              "chosen": [{"role": "assistant", "content": "4"}],
              "rejected": [{"role": "assistant", "content": "5"}]}
    assert detect_format(record) == "conversational"
    prompt = [16, 18, 9, 10, 11, 12, 11, 15, 17, 16, 19]
    assert ids(record, tok) == (prompt, [13, 17, 1], [14, 17, 1], False)


def test_conversational_implicit_prompt(tok):
    """Shared leading messages are the prompt: same ids as the explicit-prompt form."""
    user = {"role": "user", "content": "what is 2 + 2 ?"}
    record = {"chosen": [user, {"role": "assistant", "content": "4"}],
              "rejected": [user, {"role": "assistant", "content": "5"}]}
    assert ids(record, tok)[:3] == ([16, 18, 9, 10, 11, 12, 11, 15, 17, 16, 19], [13, 17, 1], [14, 17, 1])


def test_truncation_keep_end_and_keep_start(tok):
    """max_prompt_length=4 over the 6 prompt ids [9, 10, 11, 12, 11, 15]:
    keep_end -> [11, 12, 11, 15], keep_start -> [9, 10, 11, 12]; replies fit (room 8 - 4 = 4)."""
    assert ids(EXPLICIT, tok, max_length=8, max_prompt_length=4) == ([11, 12, 11, 15], [13, 1], [14, 1], True)
    assert ids(EXPLICIT, tok, max_length=8, max_prompt_length=4, truncation="keep_start") == (
        [9, 10, 11, 12], [13, 1], [14, 1], True)


def test_long_reply_keeps_its_start(tok):
    """Prompt 'hi' [6] leaves 4 - 1 = 3 positions; 'hello bye hello bye' + eos is cut to [7, 8, 7]."""
    record = {"prompt": "hi", "chosen": "hello bye hello bye", "rejected": "bye"}
    assert ids(record, tok, max_length=4, max_prompt_length=2) == ([6], [7, 8, 7], [8, 1], True)


def test_prompt_without_room_is_rejected(tok):
    """A 6-token prompt with max_length=6 leaves no position for the reply."""
    with pytest.raises(RowError, match="prompt too long: 6 tokens leave no room"):
        ids(EXPLICIT, tok, max_length=6, max_prompt_length=4)


def test_prompt_is_prefix_even_when_bpe_would_merge_across_the_boundary(tmp_path):
    """With a BPE that merges 'a'+'b' into 'ab', tokenizing 'a' + 'b' as one string gives the single
    token 'ab', so the prompt's ids are not a prefix of the whole. Tokenizing separately keeps them one."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "a": 1, "b": 2, "ab": 3}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, [("a", "b")])), eos_token="<eos>")
    fast.save_pretrained(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    assert tok("ab", add_special_tokens=False)["input_ids"] == [3]  # the merge that breaks naive splitting
    prompt, chosen, rejected, _ = ids({"prompt": "a", "chosen": "b", "rejected": "a"}, tok)
    assert (prompt, chosen, rejected) == ([1], [2, 0], [1, 0])
    assert (prompt + chosen)[: len(prompt)] == prompt


def test_chat_template_that_breaks_the_prefix_is_rejected(tmp_path):
    """This template brackets a user turn once a reply follows it: the prompt renders 'hi ' alone but
    '[hi] 4 ' inside the conversation, so no split point exists."""
    tok = load_tokenizer(save_wordlevel(tmp_path))
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' and not loop.last %}[{{ m['content'] }}] "
                         "{% else %}{{ m['content'] }} {% endif %}{% endfor %}")
    record = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "4"}],
              "rejected": [{"role": "assistant", "content": "5"}]}
    with pytest.raises(RowError, match="renders the prompt differently"):
        normalise(record, "conversational", tok)


@pytest.mark.parametrize(
    "record, fmt, reason",
    [
        ({"prompt": "hi", "chosen": 4, "rejected": "5"}, "explicit", "field 'chosen' must be a string, got int"),
        ({"prompt": "hi", "chosen": None, "rejected": "5"}, "explicit", "field 'chosen' is null"),
        ({"prompt": "hi", "rejected": "5"}, "explicit", "missing field 'chosen'"),
        ({"prompt": "hi", "chosen": "  ", "rejected": "5"}, "explicit", "empty chosen reply"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "implicit",
         "differ before the last Assistant reply"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant:"}, "implicit",
         "empty rejected reply"),
        ({"chosen": "no turns", "rejected": "no turns"}, "implicit", "no '\\\\n\\\\nAssistant:' turn"),
        ({"prompt": [{"content": "hi"}], "chosen": [{"role": "assistant", "content": "4"}],
          "rejected": [{"role": "assistant", "content": "5"}]}, "conversational", "message 1 of 'prompt' has no"),
        ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": 4}],
          "rejected": [{"role": "assistant", "content": "5"}]}, "conversational", "has no string 'content'"),
        ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "4"}],
          "rejected": [{"role": "assistant", "content": "5"}]}, "conversational", "not 'assistant'"),
        ({"foo": 1}, None, "cannot tell the row's format"),
    ],
)
def test_bad_rows_say_why(record, fmt, reason, tok):
    with pytest.raises(RowError, match=reason):
        normalise(record, fmt, tok)


def test_pair_id_explicit_or_content_hash():
    assert pair_id_of({"id": 7, "prompt": "a"}) == ("7", None)
    assert pair_id_of({"id": [1]})[1] == "field 'id' must be a string or an integer, got list"
    a, _ = pair_id_of(EXPLICIT)
    assert a == pair_id_of(dict(reversed(list(EXPLICIT.items()))))[0]  # key order does not matter
    assert a != pair_id_of({**EXPLICIT, "chosen": "5"})[0]
