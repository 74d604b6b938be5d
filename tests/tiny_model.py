"""A tiny causal language model made here, for tests that need a real inference server on the CPU.

Random weights from a fixed seed (a four-layer Llama of width 256) and a byte-level BPE tokenizer
trained here with the `tokenizers` package on a few sentences: nothing is downloaded from the Hub.
The folder is a Hugging Face checkpoint (`config.json`, `model.safetensors`, `tokenizer.json`,
`tokenizer_config.json` with a chat template) that `transformers serve` loads offline.

    python tests/tiny_model.py DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WORDS = "the time of day we can see a light over the water and then go home".split()
EOS = "<|endoftext|>"
# Plain role: content lines, then the assistant's turn: enough for /v1/chat/completions.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def make(folder: Path, seed: int = 0) -> Path:
    """Write the checkpoint into ``folder`` (made if missing); the same seed, the same bytes."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 20
    # Printable ASCII, space and newline (as byte-level BPE spells them: Ġ, Ċ) and no other bytes, so
    # that every token decodes to text by itself (a lone byte of a UTF-8 sequence would not).
    ascii_ = [chr(b) for b in range(33, 127)] + ["\u0120", "\u010a"]
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=ascii_,
                                                              special_tokens=[EOS]))
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
        "model_max_length": 512, "chat_template": CHAT_TEMPLATE}))
    torch.manual_seed(seed)
    eos = tokenizer.token_to_id(EOS)
    # Wide enough that the first token takes longer than the server's own overhead (so a client that
    # stamps TTFT at the headers or the role-only chunk is seen), small enough for a test (9 MB).
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=eos, eos_token_id=eos)
    model = LlamaForCausalLM(config)
    # Random weights may well pick the end token, which decodes to nothing: its logit is held at 0,
    # below the largest of the others, and generation has no end token, so every answer is visible
    # text and runs to max_tokens.
    with torch.no_grad():
        model.lm_head.weight[eos].zero_()
    model.generation_config.eos_token_id = None
    model.generation_config.do_sample = False   # greedy: the same prompt, the same answer
    model.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    make(Path(sys.argv[1]))
