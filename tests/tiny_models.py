"""Tiny random-init decoders (Llama, Qwen2, Gemma3) saved as DaRL checkpoints: CI needs no weights."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    Gemma3TextConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from darl_infer.checkpoint import CheckpointSpec
from darl_infer.template import Template

WORDS = [f"w{i}" for i in range(200)]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS + list(":.,!?-0123456789"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def tiny_config(arch: str, vocab_size: int):
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "gemma3":
        # window 8 < prefix + item lengths used in tests, so the sliding-window path is exercised
        return Gemma3TextConfig(**common, sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    raise ValueError(arch)


def make_checkpoint(directory: Path, arch: str, seed: int = 0, template: Template | None = None) -> Path:
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    config = tiny_config(arch, len(tokenizer))
    config.num_labels = 3
    model = AutoModelForSequenceClassification.from_config(config)
    # HF's init (std 0.02) gives near-uniform probabilities that would hide errors; std 0.25 gives
    # logits of std ~2 over the unit-RMS hidden state, the spread of a trained relevance head (bf16
    # rounding noise in probabilities grows with logit size, so a larger head would test bf16 unfairly)
    torch.nn.init.normal_(model.score.weight, std=0.25)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CheckpointSpec(template=template or Template(instruction="w1 w2 w3 w4 w5 : w6 w7", max_item_tokens=64)).save(directory)
    return directory


def random_text(rng: random.Random, n_tokens: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_tokens))


def make_adapter_checkpoint(directory: Path, base_dir: Path, seed: int = 0) -> Path:
    """A PEFT LoRA checkpoint (adapter + head) over the local base model folder `base_dir`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=3)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"], task_type="SEQ_CLS")
    model = get_peft_model(base, lora)
    for name, p in model.named_parameters():  # LoRA B starts at zero: make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(str(directory))
    CheckpointSpec(base_model=str(base_dir), template=Template(instruction="w1 w2 w3", max_item_tokens=64)).save(directory)
    return directory


def make_bi_encoder_checkpoint(directory: Path, base_dir: Path, seed: int = 0, head_hidden: int = 32) -> Path:
    """A bi-encoder checkpoint (darl_infer/bi_encoder.py) over the local base model folder `base_dir`:
    a random LoRA adapter on its trunk and a random interaction head."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModel

    from darl_infer.bi_encoder import HEAD_FILE, BiEncoderSection, InteractionHead

    torch.manual_seed(seed)
    trunk = get_peft_model(AutoModel.from_pretrained(str(base_dir)), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in trunk.named_parameters():  # LoRA B starts at zero: make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    head = InteractionHead(trunk.config.hidden_size, head_hidden, 3)
    for p in head.parameters():  # logits of std ~2, like a trained head (see make_checkpoint)
        torch.nn.init.normal_(p, std=0.15)
    directory.mkdir(parents=True, exist_ok=True)
    trunk.save_pretrained(str(directory))
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(directory / HEAD_FILE))
    CheckpointSpec(base_model=str(base_dir), template=Template(instruction="w1 w2 w3", max_item_tokens=64),
                   bi_encoder=BiEncoderSection(head_hidden=head_hidden).to_dict()).save(directory)
    return directory
