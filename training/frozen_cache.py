"""Run the frozen lower layers once per pair and keep their output: every later pass (training
steps, DASA features, dev metrics) only runs the top layers, the ones that carry LoRA.

Exact, not an approximation: the layers below `split` have no trainable parameter, so their
output for a pair never changes during training. A pair is laid out as in training (the shared
instruction as prefix, query + item packed after it); in a causal model a token's state does not
depend on whether it sits in the prefix or in the item part, so the Scorer's layout (instruction
+ query as prefix) gives the same numbers (tests/test_training.py checks both against each other).

Costs (gemma3-270m, 18 layers, LoRA on the top 6): a training step costs forward(6) + backward(6)
instead of forward(18) + backward(6), an evaluation or DASA pass 6 layers instead of 18, and the
cache is computed once and shared by every run with the same base, split, template and data.

How: the decoder's layer list (and `config.layer_types`, which HF models index by position) is
temporarily sliced, and the slice runs on hidden states through the same shared-prefix attention
as serving (darl_infer.backends.prefix_runner).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from darl_infer.atomic import atomic_file
from darl_infer.backends.attention_hook import active
from darl_infer.backends.prefix_runner import EMPTY_PREFIX, ItemsPass, PrefixKV, PrefixPass, PrefixRunner


@contextlib.contextmanager
def layer_slice(decoder: torch.nn.Module, start: int, stop: int | None = None, norm: bool = True):
    """Within the block, `decoder` runs only layers[start:stop] (and skips its final norm if not `norm`)."""
    layers, final_norm = decoder.layers, decoder.norm
    layer_types = getattr(decoder.config, "layer_types", None)
    decoder.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if layer_types is not None:
        decoder.config.layer_types = list(layer_types)[start:stop]
    if not norm:
        decoder.norm = torch.nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = layers, final_norm
        if layer_types is not None:
            decoder.config.layer_types = layer_types


class FrozenSplit:
    """Bottom layers [0, split) computed once per pair; top layers [split, L) run on their output."""

    def __init__(self, decoder: torch.nn.Module, split: int):
        self.decoder = decoder
        self.split = split
        self.runner = PrefixRunner(decoder)  # bottom passes: plain token ids in, hidden states out

    @torch.no_grad()
    def bottom(self, instruction: torch.Tensor, sequences: list[list[int]], pairs_per_pass: int = 32):
        """(instruction states (P, H), [pair states (T_i, H)]) after the frozen layers."""
        with layer_slice(self.decoder, 0, self.split, norm=False):
            instruction_states, _ = self.runner.packed([(EMPTY_PREFIX, [instruction])])
            prefix = self.runner.prefix(instruction)
            states = []
            passes = range(0, len(sequences), pairs_per_pass)
            for start in tqdm(passes, desc="frozen-layer states", unit="pass", disable=len(passes) < 10):
                part = [torch.tensor(s, dtype=torch.long) for s in sequences[start : start + pairs_per_pass]]
                hidden, cu = self.runner.packed([(prefix, part)])
                states += [hidden[cu[i] : cu[i + 1]].clone() for i in range(len(part))]
        return instruction_states.clone(), states

    def top_prefix(self, instruction_states: torch.Tensor) -> PrefixKV:
        state = PrefixPass([instruction_states.shape[0]], self.runner.attention_op)
        with layer_slice(self.decoder, self.split), active(state):
            self.decoder(inputs_embeds=instruction_states[None], position_ids=state.position_ids[None], use_cache=False)
        return state.prefixes()[0]

    def top_items(self, prefix: PrefixKV, pair_states: list[torch.Tensor]) -> torch.Tensor:
        """Final-normed hidden state at each pair's last token, (N, H)."""
        state = ItemsPass([(prefix, [s.shape[0] for s in pair_states])], self.runner.attention_op)
        with layer_slice(self.decoder, self.split), active(state):
            out = self.decoder(
                inputs_embeds=torch.cat(pair_states)[None], position_ids=state.position_ids[None], use_cache=False
            )
        return out.last_hidden_state[0][state.cu_seqlens[1:] - 1]


class StateStore:
    """Bottom-layer states of pair sequences, in memory and on disk.

    On disk, one folder per (base model, split, instruction) -- every state in it is valid for any
    run that shares those three -- and one file per requested list of sequences, named by a hash of
    the list and written atomically. A list seen before is one file read; a new list (other subsets,
    another data mix) first takes whatever states the folder already holds, computes only the
    sequences that none of its files has, and is written only if it needed any.
    """

    def __init__(self, directory: str | Path, base_model: str, split: int, instruction: torch.Tensor):
        context = json.dumps([base_model, split, instruction.tolist()])
        self.directory = Path(directory) / hashlib.sha256(context.encode()).hexdigest()[:16]
        self.instruction = instruction
        self.memory: dict[tuple[int, ...], torch.Tensor] = {}
        self.instruction_states: torch.Tensor | None = None
        self.loaded: set[Path] = set()

    def _load(self, path: Path) -> None:
        data = torch.load(path, weights_only=True)
        self.instruction_states = data["instruction"]
        self.memory.update(zip(map(tuple, data["sequences"]), data["pairs"]))
        self.loaded.add(path)

    def get(self, frozen: FrozenSplit, sequences: list[list[int]]):
        """(instruction states (P, H), [states (T_i, H) of each sequence])."""
        path = self.directory / f"{hashlib.sha256(json.dumps(sequences).encode()).hexdigest()[:24]}.pt"
        if self._missing(sequences) and path.is_file():
            self._load(path)
        if self._missing(sequences):
            for other in sorted(set(self.directory.glob("*.pt")) - self.loaded):
                self._load(other)
        missing = self._missing(sequences)
        if missing or self.instruction_states is None:
            if missing:  # the one slow step of a cold run: say so before it starts
                print(f"frozen-layer cache: computing {len(missing)} of {len(sequences)} pair states", flush=True)
            self.instruction_states, states = frozen.bottom(self.instruction, [list(s) for s in missing])
            self.memory.update(zip(missing, states))
            self.directory.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, "wb") as f:
                torch.save({"instruction": self.instruction_states, "sequences": sequences,
                            "pairs": [self.memory[tuple(s)] for s in sequences]}, f)
            self.loaded.add(path)
        return self.instruction_states, [self.memory[tuple(s)] for s in sequences]

    def _missing(self, sequences: list[list[int]]) -> list[tuple[int, ...]]:
        return sorted({tuple(s) for s in sequences if tuple(s) not in self.memory})
