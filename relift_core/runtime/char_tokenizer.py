"""A character-level tokenizer built locally with the `tokenizers` library (no download).

The tiny proof-world models use it: one token per character keeps digits separate, which is what
an arithmetic model needs, and the vocabulary is small enough for a model of a few hundred
thousand parameters. It carries a ChatML chat template so the rest of the platform treats it
exactly like a real chat model's tokenizer.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<|im_start|>", "<|im_end|>", "<unk>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Multi-character markers that are single tokens: the chat frame and the reasoning tags.
# The special ones by their role in a transformers tokenizer, in vocabulary order.
SPECIAL_TOKEN_ROLES = {"pad_token": PAD, "bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
SPECIAL_TOKENS = list(SPECIAL_TOKEN_ROLES.values())
ADDED_TOKENS = [THINK_OPEN, THINK_CLOSE, "\\boxed"]
CHARS = sorted(set(string.printable) - set("\x0b\x0c\r"))
VOCAB_SIZE = len(SPECIAL_TOKENS) + len(ADDED_TOKENS) + len(CHARS)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Printable ASCII plus newline, one token each; deterministic ids (same vocab every call)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ADDED_TOKENS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token; WordLevel then maps it to its id.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    core.add_tokens(ADDED_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, padding_side="left", **SPECIAL_TOKEN_ROLES)
    tok.chat_template = CHATML_TEMPLATE
    return tok
