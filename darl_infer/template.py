"""The prompt template: how a (query, item) pair becomes tokens.

prefix = [BOS] + instruction + query label + query + item label   (shared by all items of a query)
suffix = item + answer cue                                         (one per item)

Every segment is tokenized on its own and the ids are concatenated, so no BPE merge crosses a
segment boundary: the prefix tokens never depend on the item, which is what makes computing the
prefix once per query exact. The item label is the same for every item, so it ends the prefix
rather than starting each suffix: the same tokens at the same positions, computed once per query
(on Home Depot titles with a 256-token instruction, 14 % fewer item tokens; bench/RESULTS.md).
Training and serving both call `Template.encode`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .config import from_fields
from .validate import check_items, check_text


@dataclass(frozen=True)
class Template:
    instruction: str = (
        "Grade how relevant the item is to the search query: "
        "0 irrelevant, 1 weakly relevant, 2 strongly relevant."
    )
    query_label: str = "\nQuery: "
    item_label: str = "\nItem: "
    answer_cue: str = "\nRelevance:"
    max_query_tokens: int = 64
    max_item_tokens: int = 128

    @classmethod
    def from_dict(cls, d: dict) -> "Template":
        t = from_fields(cls, d, "template")
        for name in ("instruction", "query_label", "item_label", "answer_cue"):
            if not isinstance(getattr(t, name), str):
                raise ValueError(f"template field {name!r} must be a string")
        for name in ("max_query_tokens", "max_item_tokens"):
            v = getattr(t, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"template field {name!r} must be a positive integer, got {v!r}")
        return t

    def to_dict(self) -> dict:
        return asdict(self)

    def encoder(self, tokenizer) -> "TemplateEncoder":
        return TemplateEncoder(self, tokenizer)


@dataclass
class Encoded:
    prefix: list[int]          # BOS + instruction + query label + query + item label
    suffixes: list[list[int]]  # item + answer cue, one per item
    truncated: list[bool]      # query or that item was cut to its token limit
    instruction_len: int = 0   # tokens of BOS + instruction at the start of `prefix`
    query: list[int] = field(default_factory=list)  # the query's own tokens, cut to its limit (inside `prefix`)
    meta: dict = field(default_factory=dict)


class TemplateEncoder:
    """A template bound to a tokenizer, with the constant segments tokenized once."""

    def __init__(self, template: Template, tokenizer):
        self.template = template
        self.tokenizer = tokenizer
        # Thread safety: a HF fast tokenizer's call switches off its backend's truncation and
        # padding settings when they are set (and never back on). The calls below make that
        # happen here, once, so later calls from several threads only read the tokenizer.
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
        self.bos = [bos] if adds_bos else []
        self.instruction = self.bos + self._ids(template.instruction)
        self.query_label = self._ids(template.query_label)
        self.item_label = self._ids(template.item_label)
        self.answer_cue = self._ids(template.answer_cue)
        if not self.answer_cue:
            raise ValueError("template answer_cue must produce at least one token")
        # Items are tokenized by the fast tokenizer's Rust backend directly: HF's call runs that same
        # `encode_batch`, then converts every encoding to Python dicts (encode of 1,000 items with
        # the default model's tokenizer: 12.4-13.0 -> 10.0-10.3 ms, 2-core Xeon, bench/encode_speed.py;
        # on a GPU host tokenizing was 28 % of a 1,000-item query). Only while the backend is as HF's
        # own call leaves it: no truncation or padding, special tokens as the tokenizer says.
        self.backend = getattr(tokenizer, "backend_tokenizer", None)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def _backend_as_hf_leaves_it(self) -> bool:
        backend = self.backend
        return (
            backend is not None and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == getattr(self.tokenizer, "split_special_tokens", False)
        )

    def _ids_many(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._backend_as_hf_leaves_it():
            return [encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False).input_ids  # resets the backend as above

    def encode(self, query: str, items) -> Encoded:
        """`items`: any ordered iterable of str, read once (validate.check_items)."""
        q, q_cut = self.query_ids(query)
        suffixes, item_cut = self.item_suffixes(items)
        prefix = self.instruction + self.query_label + q + self.item_label
        truncated = [cut or q_cut for cut in item_cut]
        return Encoded(prefix, suffixes, truncated, instruction_len=len(self.instruction), query=q)

    def query_ids(self, query: str) -> tuple[list[int], bool]:
        """The query's tokens cut to its limit, and whether it was cut."""
        check_text(query, "query")
        if not query.strip():
            raise ValueError("query is empty")
        q = self._ids(query)
        return q[: self.template.max_query_tokens], len(q) > self.template.max_query_tokens

    def item_suffixes(self, items) -> tuple[list[list[int]], list[bool]]:
        """Each item's suffix (item cut to its limit + answer cue) and whether it was cut."""
        suffixes, truncated = [], []
        for ids in self._ids_many(check_items(items)):
            truncated.append(len(ids) > self.template.max_item_tokens)
            suffixes.append(ids[: self.template.max_item_tokens] + self.answer_cue)
        return suffixes, truncated
