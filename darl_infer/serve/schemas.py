"""Request and response bodies of the rerank endpoints.

`TeiRerankRequest` / `TeiRankItem`: text-embeddings-inference's `POST /rerank`.
`CohereRerankRequest` / `CohereRerankResponse`: Cohere's `POST /v2/rerank` and the Jina-style
`POST /v1/rerank` that LiteLLM, LangChain, LlamaIndex and Infinity speak.
`return_grades` is darl_infer's own addition to both: the argmax grade's label and every grade's
probability. Unknown request fields are ignored, as TEI and Cohere do (clients send extras such as
Cohere's `max_tokens_per_doc`). Flags and counts are strict: `"true"` or `1.0` is a 422, not a guess.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr


class TeiRerankRequest(BaseModel):
    query: StrictStr
    texts: list[StrictStr]
    raw_scores: StrictBool = False       # true: `score` is the expected grade itself, not normalised
    return_text: StrictBool = False
    truncate: StrictBool | None = None   # null is false: an over-long text is a 413 (TEI's default)
    truncation_direction: Literal["Right", "Left"] = "Right"
    return_grades: StrictBool = False


class TeiRankItem(BaseModel):
    index: int
    score: float
    text: str | None = None
    grade: str | None = None
    probabilities: dict[str, float] | None = None
    graded_by: str | None = None  # with --cascade: "coarse" or "fine"


class Document(BaseModel):
    text: StrictStr


class CohereRerankRequest(BaseModel):
    model: StrictStr | None = None       # echoed back as the served model's id whatever is sent
    query: StrictStr
    documents: list[StrictStr | Document]  # strings (Cohere v2) or {"text": ...} objects (Jina, Cohere v1)
    top_n: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = False
    return_grades: StrictBool = False

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class CohereResult(BaseModel):
    index: int
    relevance_score: float  # expected grade rescaled to [0, 1] by the lowest and highest grade value
    document: Document | None = None
    grade: str | None = None
    probabilities: dict[str, float] | None = None
    graded_by: str | None = None  # with --cascade: "coarse" or "fine"


class Usage(BaseModel):
    total_tokens: int  # tokens scored for this request: its prefix once plus every item


class CohereRerankResponse(BaseModel):
    id: str
    model: str
    results: list[CohereResult]
    usage: Usage


class ErrorBody(BaseModel):
    error: str
    error_type: str
