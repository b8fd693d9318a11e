"""Tiny random models and a byte-level tokenizer built in code, for tests and smoke runs.

``tiny-random:<name>`` is a model source like a registry name: it builds the model
below with a fixed seed, so every process (a test, a Ray replica) gets the same weights
without any file. The drafter is the verifier with noise on its LM head, so the pair
agrees often enough, and confidences spread widely enough, for every tier to be exercised.
"""

from __future__ import annotations

import torch

SOURCE_PREFIX = "tiny-random:"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ARCH = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.3)
LAYER_OUTPUT_SCALE = 0.3  # smaller residual updates: dropping a layer changes less, as in trained models
HEAD_SCALE = 4.0  # sharper next-token distributions: confidences spread over (0, 1]
SPECS = {
    "verifier": dict(seed=0, head_noise=0.0),
    # the verifier with noise on its LM head: agrees on ~60% of tokens, more where it is confident
    "drafter": dict(seed=0, head_noise=0.3),
    # a verifier ~10x the drafter's compute, like the real pairs (tests of per-tier load and autoscaling)
    "verifier-wide": dict(seed=0, head_noise=0.0, arch=dict(num_hidden_layers=8, hidden_size=384,
                                                            intermediate_size=1536, num_attention_heads=8)),
}


def is_tiny(source: str) -> bool:
    return source.startswith(SOURCE_PREFIX)


def tiny_tokenizer():
    """A byte-level tokenizer: 256 byte tokens and the ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(name: str = "verifier", dtype: torch.dtype = torch.float32, model_type: str = "qwen2"):
    """The tiny random model ``name`` (see ``SPECS``), identical in every process."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        spec = SPECS[name]
    except KeyError:
        raise KeyError(f"unknown tiny model {name!r}; expected one of {sorted(SPECS)}") from None
    config = AutoConfig.for_model(
        model_type, vocab_size=VOCAB_SIZE, tie_word_embeddings=False, eos_token_id=VOCAB_SIZE - 1,
        bos_token_id=None, pad_token_id=VOCAB_SIZE - 3, **{**ARCH, **spec.get("arch", {})},
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = VOCAB_SIZE - 1
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(LAYER_OUTPUT_SCALE)
            layer.mlp.down_proj.weight.mul_(LAYER_OUTPUT_SCALE)
        head = model.lm_head.weight
        head.mul_(HEAD_SCALE)
        if spec["head_noise"]:
            noise = torch.randn(head.shape, generator=torch.Generator().manual_seed(spec["seed"] + 1))
            head.add_(noise * spec["head_noise"] * head.std())
    return model.to(dtype).eval()


def save_tiny(directory, name: str = "verifier", model_type: str = "qwen2") -> None:
    """Write the tiny model and tokenizer as a Hugging Face checkpoint directory (safetensors)."""
    tiny_model(name, model_type=model_type).save_pretrained(directory, safe_serialization=True)
    tiny_tokenizer().save_pretrained(directory)
