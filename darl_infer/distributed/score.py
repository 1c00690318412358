"""`score_dataset`: a Ray Dataset of (query, item) rows scored by a pool of actors, each holding one
`Scorer` loaded once.

Prefix reuse: each batch is scored in one `score_many` call, which runs each distinct query's
prefix once for all of that query's items in the batch. On input sorted (or written) by query,
which is how retrieval output usually arrives, a query's pairs lie in at most two consecutive
batches unless it has more pairs than a batch holds, so its prefix runs about once, with no
shuffle: the cost is at most one extra prefix run per batch boundary. For input in no particular
order, `group_by_query=True` makes each query's pairs one batch through `groupby("query")`, at
the price of a hash shuffle of the whole dataset (all rows cross the object store once).
"""

from __future__ import annotations

import pyarrow as pa

from ..checkpoint import resolve_checkpoint
from ..jsonl import pair_error
from ..pairs import score_pairs


class ScoreBatches:
    """A Ray Data actor: scores the valid rows of each batch; a row that cannot be scored keeps
    null scores and its reason in `darl_error`."""

    def __init__(self, checkpoint=None, num_threads: int = 1, **scorer_options):
        import torch

        from ..scorer import Scorer

        torch.set_num_threads(num_threads)  # the CPUs Ray granted this actor, not the whole node's
        self.scorer = Scorer.from_pretrained(checkpoint, **scorer_options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        queries, items = batch["query"].to_pylist(), batch["item"].to_pylist()
        given = batch["darl_error"].to_pylist() if "darl_error" in batch.column_names else [None] * batch.num_rows
        errors = [given[i] or pair_error({"query": queries[i], "item": items[i]}) for i in range(batch.num_rows)]
        valid = [i for i, error in enumerate(errors) if error is None]
        scored = dict(zip(valid, score_pairs(self.scorer, [queries[i] for i in valid], [items[i] for i in valid])))
        fields = [scored.get(i, {}) for i in range(batch.num_rows)]
        columns = {
            "score": pa.array([f.get("score") for f in fields], pa.float64()),
            "grade": pa.array([f.get("grade") for f in fields], pa.int64()),
            "probs": pa.array([f.get("probs") for f in fields], pa.list_(pa.float64())),
            "truncated": pa.array([f.get("truncated") for f in fields], pa.bool_()),
            "darl_error": pa.array(errors, pa.string()),
        }
        for name, column in columns.items():
            batch = batch.drop_columns([name]) if name in batch.column_names else batch
            batch = batch.append_column(name, column)
        return batch


def score_dataset(
    ds,
    checkpoint=None,
    *,
    actors: int = 1,
    num_cpus: float = 1,
    num_gpus: float = 0,
    batch_size: int = 256,
    group_by_query: bool = False,
    **scorer_options,
):
    """`ds` (any Ray Dataset with string columns query and item) with columns score, grade, probs,
    truncated added, and darl_error: null where the row was scored, else why it could not be.

    `actors` actors each hold one Scorer (`checkpoint`, `**scorer_options` as for
    `Scorer.from_pretrained`) and take `num_cpus`/`num_gpus` each; torch in an actor uses
    max(1, round(num_cpus)) threads. A killed actor is restarted by Ray and its batch retried.
    Lazy, like every Ray Dataset transform: nothing runs until the result is consumed or written.
    """
    if actors < 1 or batch_size < 1:
        raise ValueError(f"actors and batch_size must be >= 1, got {actors} and {batch_size}")
    resolve_checkpoint(checkpoint)  # named here, not as an actor that dies at start and is retried
    import ray.data

    options = dict(
        fn_constructor_kwargs=dict(checkpoint=checkpoint, num_threads=max(1, round(num_cpus)), **scorer_options),
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_format="pyarrow",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    if group_by_query:
        return ds.groupby("query").map_groups(ScoreBatches, **options)
    return ds.map_batches(ScoreBatches, batch_size=batch_size, **options)
