"""The bi-encoder student being trained (`darl-distill` with `"student": "bi-encoder"`): LoRA on its
trunk (a base decoder, e.g. the teacher's bottom layers "gemma3-270m@2") and a new interaction head.

Every pair's query and item are encoded exactly as `BiEncoderScorer` encodes them (the same
template pieces, the same `TextVectors`), so the saved checkpoint scores what was trained.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from darl_infer.base_models import base_model_dir
from darl_infer.bi_encoder import HEAD_FILE, BiEncoderSection, InteractionHead, TextVectors
from darl_infer.kernels.shared_prefix_attention import shared_prefix_attention_reference
from darl_infer.loading import load_base_decoder
from darl_infer.template import Template

from .data import Pair
from .train import LORA_TARGETS

TOKEN_BUDGET = 4096  # tokens per packed training pass (a batch of 16 pairs is far below it)


class BiEncoderTrainee:
    frozen = None  # no frozen-layer cache: every layer of a small trunk trains

    def __init__(self, config, template: Template, num_labels: int):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoTokenizer

        decoder = load_base_decoder(config.base_model, torch.float32)
        self.encoder = template.encoder(AutoTokenizer.from_pretrained(str(base_model_dir(config.base_model))))
        n_layers = decoder.config.num_hidden_layers
        lora = LoraConfig(
            r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=LORA_TARGETS, layers_to_transform=list(range(max(0, n_layers - config.lora_layers), n_layers)),
            layers_pattern="layers",
        )
        self.peft_model = get_peft_model(decoder, lora)
        self.section = BiEncoderSection(head_hidden=config.head_hidden)
        self.head = InteractionHead(decoder.config.hidden_size, config.head_hidden, num_labels)
        self.vectors = TextVectors(self.peft_model.base_model.model, TOKEN_BUDGET, shared_prefix_attention_reference)
        self.query_prefix = self.encoder.bos + self.encoder.query_label
        self.item_prefix = self.encoder.bos + self.encoder.item_label

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.peft_model.parameters() if p.requires_grad] + list(self.head.parameters())

    def sequences(self, pairs: list[Pair]) -> list[tuple[list[int], list[int]]]:
        """(query tokens, item tokens) of each pair, each after its kind's shared prefix."""
        out = []
        for p in pairs:
            enc = self.encoder.encode(p.query, [p.item])
            out.append((enc.query + self.encoder.answer_cue, enc.suffixes[0]))
        return out

    def logits(self, sequences: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        queries = self.vectors(self.query_prefix, [q for q, _ in sequences])
        items = self.vectors(self.item_prefix, [i for _, i in sequences])
        return self.head(queries, items).float()

    def train(self) -> None:
        self.peft_model.train()
        self.head.train()

    def save_weights(self, directory: Path) -> None:
        self.peft_model.save_pretrained(str(directory))
        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()}, str(Path(directory) / HEAD_FILE))
