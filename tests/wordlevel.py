"""A word-level tokenizer whose ids can be checked by hand in test docstrings.

Words and punctuation map to the ids in VOCAB; a chat template in the ChatML
shape, with spaces instead of newlines so the whitespace pre-tokenizer keeps
every piece visible.
"""

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VOCAB = {
    "<pad>": 0, "<eos>": 1, "<unk>": 2, "Human": 3, ":": 4, "Assistant": 5, "hi": 6, "hello": 7, "bye": 8,
    "what": 9, "is": 10, "2": 11, "+": 12, "4": 13, "5": 14, "?": 15, "<|im_start|>": 16, "<|im_end|>": 17,
    "user": 18, "assistant": 19,
}
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def save_wordlevel(folder) -> str:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(folder))
    return str(folder)
