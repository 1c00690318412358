"""`darl-infer score --engine ray`: read pairs with Ray Data, score them on an actor pool, write a
directory of scored parts.

The output directory appears whole or not at all (atomic.atomic_dir): parts are written into a
temporary directory beside it, which is renamed when every block is written. It then holds
part-*.{jsonl,parquet}, errors/part-*.jsonl (bad rows with file:line and reason) and
_SUCCESS.json (counts and options).
"""

from __future__ import annotations

import json
import os
import sys
import time

from ..atomic import atomic_dir
from ..checkpoint import resolve_checkpoint
from ..jsonl import DataError
from .read import IO_TASK_CPUS, read_pairs
from .score import score_dataset
from .write import ScoredPairsSink


def _check_cpus(args, cluster_cpus: float) -> None:
    """Ray Data starts the actor pool first; if it holds every CPU, the read task never gets one and
    the job waits forever (seen with 2 actors of 1 CPU on a 2-CPU Ray). Name it instead."""
    need = args.actors * args.num_cpus + 2 * IO_TASK_CPUS
    if need <= cluster_cpus:
        return
    message = (f"--actors {args.actors} x --num-cpus {args.num_cpus:g} plus {2 * IO_TASK_CPUS:g} CPU for reading and writing "
               f"needs {need:g} CPUs; this Ray has {cluster_cpus:g}: lower --num-cpus (fractions are fine) or --actors")
    if args.address is None and "RAY_ADDRESS" not in os.environ:  # the local Ray this job started
        raise DataError(message)
    print(f"darl-infer: warning: {message} (unless the cluster scales up)", file=sys.stderr)


def _data_error(error: BaseException) -> DataError | None:
    """The DataError (a bad row under --on-error fail) inside Ray's wrappers of a task's exception."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error) is DataError:
            return error
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None


def run(args) -> int:
    import ray

    resolve_checkpoint(args.checkpoint)  # a missing checkpoint is named before Ray starts
    if args.cascade is not None:
        raise DataError("--cascade is not supported with --engine ray yet; score with one checkpoint")
    if args.output == "-":
        raise DataError("--engine ray writes a directory: give --output DIR")
    input_format = args.input_format or ("parquet" if str(args.input).rstrip("/").endswith(".parquet") else "jsonl")
    try:
        ds = read_pairs(args.input, input_format)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None
    if not ray.is_initialized():
        ray.init(address=args.address, log_to_driver=False)
    _check_cpus(args, ray.cluster_resources().get("CPU", 0))
    started = time.perf_counter()
    with atomic_dir(args.output, replace=args.overwrite) as tmp:
        scored = score_dataset(
            ds, args.checkpoint, actors=args.actors, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
            batch_size=args.buffer, group_by_query=args.group_by_query, backend=args.backend, dtype=args.dtype,
        )
        sink = ScoredPairsSink(tmp, format=args.format or input_format, on_error=args.on_error)
        try:
            scored.write_datasink(sink, ray_remote_args={"num_cpus": IO_TASK_CPUS})
        except Exception as e:
            bad_row = _data_error(e)
            if bad_row is None:
                raise
            raise bad_row from None
        seconds = time.perf_counter() - started
        summary = dict(sink.counts, seconds=round(seconds, 3), actors=args.actors, input=str(args.input),
                       format=args.format or input_format, checkpoint=str(args.checkpoint or "default"))
        (tmp / "_SUCCESS.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"scored {sink.counts['rows']} pairs in {seconds:.1f} s ({sink.counts['rows'] / seconds:.1f} pairs/s), "
          f"{sink.counts['errors']} bad rows in {args.output}/errors/ -> {args.output}", file=sys.stderr)
    return 0
