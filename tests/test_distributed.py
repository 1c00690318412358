"""`darl-infer score --engine ray` and `darl_infer.distributed` on a local Ray (2 CPUs, one per
actor): the scores equal the local `darl-infer score` on the same file (itself checked against the
reference backend in test_scorer_exactness / test_bad_input), whatever the batching, actors,
grouping or format; bad rows go to errors/ with file:line; a killed actor loses no row and
duplicates none."""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from darl_infer.cli import main  # noqa: E402
from darl_infer.distributed import ScoreBatches  # noqa: E402
from tiny_models import random_text  # noqa: E402

SCORE_FIELDS = ("score", "grade", "probs", "truncated")
ACTOR_TITLE = b"ray::MapWorker(MapBatches(ScoreBatches))"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints):
    return str(tiny_checkpoints["llama"])


def write_pairs(path, n_queries: int, seed: int = 0, shuffle: bool = False) -> list[dict]:
    """JSONL of pairs grouped by query (as retrieval writes them) or shuffled; each row has an id."""
    rng = random.Random(seed)
    rows = []
    for q in range(n_queries):
        query = random_text(rng, rng.randint(2, 12))
        for _ in range(rng.randint(1, 9)):
            rows.append({"id": len(rows), "query": query, "item": random_text(rng, rng.randint(1, 40)), "label": rng.randint(0, 2)})
    if shuffle:
        rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def local_scores(tmp_path, input_path, checkpoint) -> dict[int, dict]:
    out = tmp_path / "local.jsonl"
    assert main(["score", "--input", str(input_path), "--output", str(out), "--checkpoint", checkpoint]) == 0
    return {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}


def read_output(directory, fmt: str = "jsonl") -> list[dict]:
    rows = []
    for part in sorted(glob.glob(f"{directory}/part-*.{fmt}")):
        if fmt == "jsonl":
            rows += [json.loads(line) for line in open(part)]
        else:
            rows += pq.read_table(part).to_pylist()
    return rows


def assert_same_scores(rows: list[dict], expected: dict[int, dict]) -> None:
    """Every input row exactly once, with its input fields and the local CLI's scores."""
    assert sorted(row["id"] for row in rows) == sorted(expected)
    for row in rows:
        local = expected[row["id"]]
        assert {k: row[k] for k in local if k not in SCORE_FIELDS} == {k: v for k, v in local.items() if k not in SCORE_FIELDS}
        assert row["grade"] == local["grade"] and row["truncated"] == local["truncated"]
        assert row["score"] == pytest.approx(local["score"], abs=1e-6)
        assert row["probs"] == pytest.approx(local["probs"], abs=1e-6)


def ray_score(input_path, output, checkpoint, *extra) -> int:
    return main(["score", "--engine", "ray", "--input", str(input_path), "--output", str(output), "--checkpoint", checkpoint, *extra])


def test_two_actors_equal_the_local_cli(tmp_path, checkpoint):
    rows = write_pairs(tmp_path / "pairs.jsonl", 40)
    assert ray_score(tmp_path / "pairs.jsonl", tmp_path / "out", checkpoint, "--actors", "2", "--num-cpus", "0.75", "--buffer", "16") == 0
    assert_same_scores(read_output(tmp_path / "out"), local_scores(tmp_path, tmp_path / "pairs.jsonl", checkpoint))
    summary = json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())
    assert (summary["rows"], summary["errors"], summary["actors"]) == (len(rows), 0, 2)
    assert not list((tmp_path / "out" / "errors").iterdir())


def test_group_by_query_and_parquet_in_and_out(tmp_path, checkpoint):
    rows = write_pairs(tmp_path / "pairs.jsonl", 25, seed=1, shuffle=True)
    pq.write_table(__import__("pyarrow").Table.from_pylist(rows), tmp_path / "pairs.parquet")
    assert ray_score(tmp_path / "pairs.parquet", tmp_path / "out", checkpoint, "--group-by-query", "--num-cpus", "1") == 0
    assert_same_scores(read_output(tmp_path / "out", "parquet"), local_scores(tmp_path, tmp_path / "pairs.jsonl", checkpoint))


def test_glob_of_files_to_jsonl(tmp_path, checkpoint):
    a = write_pairs(tmp_path / "a.jsonl", 6, seed=2)
    b = write_pairs(tmp_path / "b.jsonl", 6, seed=3)
    for row in b:
        row["id"] += len(a)
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b))
    (tmp_path / "all.jsonl").write_text((tmp_path / "a.jsonl").read_text() + (tmp_path / "b.jsonl").read_text())
    assert ray_score(tmp_path / "[ab].jsonl", tmp_path / "out", checkpoint) == 0
    assert_same_scores(read_output(tmp_path / "out"), local_scores(tmp_path, tmp_path / "all.jsonl", checkpoint))


def test_python_api_on_any_ray_dataset(tmp_path, checkpoint):
    """score_dataset on a dataset from Ray's own reader (here a file:// URI through read_json)."""
    from darl_infer.distributed import score_dataset

    rows = write_pairs(tmp_path / "pairs.jsonl", 8, seed=7)
    ds = ray.data.read_json(f"file://{tmp_path / 'pairs.jsonl'}")
    scored = score_dataset(ds, checkpoint, batch_size=5).take_all()
    assert all(row["darl_error"] is None for row in scored)
    assert_same_scores([{k: v for k, v in row.items() if k != "darl_error"} for row in scored],
                       local_scores(tmp_path, tmp_path / "pairs.jsonl", checkpoint))
    assert len(scored) == len(rows)


def test_bad_rows_go_to_errors_with_file_and_line(tmp_path, checkpoint, capsys):
    rows = write_pairs(tmp_path / "good.jsonl", 5, seed=4)
    lines = (tmp_path / "good.jsonl").read_bytes().splitlines(keepends=True)
    bad = [b"{not json\n", b'{"query": "", "item": "x"}\n', b'{"query": "q", "item": 3}\n', b"[1, 2]\n", b'{"query": "q", "item": "caf\xe9"}\n']
    mixed = lines[:3] + [bad[0], b"\n"] + lines[3:7] + bad[1:] + lines[7:]
    (tmp_path / "mixed.jsonl").write_bytes(b"".join(mixed))
    assert ray_score(tmp_path / "mixed.jsonl", tmp_path / "out", checkpoint) == 0
    assert_same_scores(read_output(tmp_path / "out"), local_scores(tmp_path, tmp_path / "good.jsonl", checkpoint))
    errors = [json.loads(line) for part in glob.glob(f"{tmp_path}/out/errors/*.jsonl") for line in open(part)]
    name = tmp_path / "mixed.jsonl"
    assert sorted((e["source"], e["error"]) for e in errors) == sorted([
        (f"{name}:4", "malformed JSON (Expecting property name enclosed in double quotes)"),
        (f"{name}:10", "field 'query' is empty"),
        (f"{name}:11", "field 'item' must be a string"),
        (f"{name}:12", "expected a JSON object"),
        (f"{name}:13", "not valid UTF-8 (byte b'\\xe9' at column 28)"),
    ])
    assert json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())["errors"] == 5
    assert len(rows) == sum(1 for _ in read_output(tmp_path / "out"))


def test_on_error_fail_stops_and_leaves_no_output(tmp_path, checkpoint, capsys):
    write_pairs(tmp_path / "good.jsonl", 5, seed=5)
    text = (tmp_path / "good.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "bad.jsonl").write_text("".join(text[:2] + ['{"query": 1, "item": "x"}\n'] + text[2:]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("the user's")
    assert ray_score(tmp_path / "bad.jsonl", tmp_path / "out", checkpoint, "--on-error", "fail", "--overwrite") == 2
    assert f"{tmp_path / 'bad.jsonl'}:3: field 'query' must be a string" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["kept.txt"]
    assert not glob.glob(f"{tmp_path}/out.*.partial")


def test_actors_holding_every_cpu_are_refused_before_they_deadlock(tmp_path, checkpoint, capsys):
    write_pairs(tmp_path / "pairs.jsonl", 2)
    assert ray_score(tmp_path / "pairs.jsonl", tmp_path / "out", checkpoint, "--actors", "2") == 2
    assert "needs 2.5 CPUs; this Ray has 2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_without_overwrite(tmp_path, checkpoint, capsys):
    write_pairs(tmp_path / "pairs.jsonl", 2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("the user's")
    assert ray_score(tmp_path / "pairs.jsonl", tmp_path / "out", checkpoint) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "kept.txt").read_text() == "the user's"


def actor_pids() -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(ACTOR_TITLE):
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def test_killed_actor_is_restarted_and_no_row_is_lost_or_repeated(tmp_path, checkpoint):
    rows = write_pairs(tmp_path / "pairs.jsonl", 400, seed=6)
    result = {}
    job = threading.Thread(target=lambda: result.update(code=ray_score(
        tmp_path / "pairs.jsonl", tmp_path / "out", checkpoint, "--buffer", "8")))
    job.start()
    deadline = time.monotonic() + 120
    while not glob.glob(f"{tmp_path}/out.*.partial/part-*") and time.monotonic() < deadline:
        time.sleep(0.01)
    (victim,) = actor_pids()
    os.kill(victim, signal.SIGSTOP)  # freeze it with batches in flight, then kill it there
    written = sum(1 for _ in read_output(glob.glob(f"{tmp_path}/out.*.partial")[0]))
    os.kill(victim, signal.SIGKILL)
    assert written < len(rows), "the job ended before the kill: make the input larger"
    job.join(timeout=300)
    assert result.get("code") == 0
    replacement = actor_pids()
    assert victim not in replacement
    assert_same_scores(read_output(tmp_path / "out"), local_scores(tmp_path, tmp_path / "pairs.jsonl", checkpoint))


def test_one_score_many_call_per_batch_with_each_query_once(checkpoint):
    """Prefix reuse: a batch's pairs go to the scorer grouped by query, each query's prefix once."""
    import pyarrow as pa

    actor = ScoreBatches(checkpoint)
    calls = []
    score_many = actor.scorer.score_many
    actor.scorer.score_many = lambda batch: calls.append([(q, list(items)) for q, items in batch]) or score_many(calls[-1])
    batch = pa.table({"query": ["a b", "c", "a b", None, "c", "a b"], "item": ["x", "y", "z", "w", "v", "u"]})
    out = actor(batch)
    assert calls == [[("a b", ["x", "z", "u"]), ("c", ["y", "v"])]]
    assert out["darl_error"].to_pylist() == [None, None, None, "field 'query' must be a string", None, None]
    assert out["score"].to_pylist()[3] is None and all(s is not None for i, s in enumerate(out["score"].to_pylist()) if i != 3)
