"""Tests for cells as idempotent units: atomic claims, shards, and two workers on one folder.

Cells are "trained" by test_compare_grid's stand-in (`fake_train`), slowed down here so that two
workers really overlap.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from test_compare_grid import fake_train, spec

from lrft.compare import plan, report, run_comparison
from lrft.compare.claims import claim_path, is_stale, read_owner, try_claim
from lrft.compare.run import shard_cells
from lrft.errors import RecipeError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------- claims


def test_a_claim_is_exclusive_until_released(tmp_path):
    cell = tmp_path / "adamw" / "rte" / "seed1"
    first = try_claim(cell, owner="a:1")
    assert first is not None and claim_path(cell) == cell.with_name("seed1.claim")
    assert read_owner(claim_path(cell)) == "a:1"
    assert try_claim(cell, owner="b:2") is None, "held by a live, fresh claim"
    first.release()
    assert not claim_path(cell).exists()
    second = try_claim(cell, owner="b:2")
    assert second is not None
    first.release()  # releasing someone else's claim does nothing
    assert read_owner(claim_path(cell)) == "b:2"


def test_a_dead_workers_claim_on_this_host_is_taken_over_at_once(tmp_path):
    cell = tmp_path / "cell"
    claim_path(cell).write_text(json.dumps({"owner": f"{socket.gethostname()}:{_dead_pid()}"}))
    assert is_stale(claim_path(cell))
    taken = try_claim(cell, owner="me:1")
    assert taken is not None and read_owner(claim_path(cell)) == "me:1"
    assert [p.name for p in tmp_path.iterdir()] == ["cell.claim"], "no tomb left behind"


def test_a_claim_from_another_host_expires_without_heartbeats(tmp_path):
    cell = tmp_path / "cell"
    path = claim_path(cell)
    path.write_text(json.dumps({"owner": "elsewhere:123"}))
    assert try_claim(cell, owner="me:1", stale_after=600) is None
    old = time.time() - 601
    os.utime(path, (old, old))
    assert try_claim(cell, owner="me:1", stale_after=600) is not None


def test_a_heartbeat_keeps_a_claim_fresh(tmp_path):
    claim = try_claim(tmp_path / "cell", owner="me:1")
    old = time.time() - 1000
    os.utime(claim.path, (old, old))
    claim.heartbeat(every=0.05)
    time.sleep(0.3)
    assert time.time() - claim.path.stat().st_mtime < 5
    claim.release()


# ---------------------------------------------------------------------------- shards


def test_shards_partition_the_cells(tmp_path, tiny_bert, tiny_glue):
    cells = plan(spec(tmp_path, tiny_bert, tiny_glue, lr_grid={"points": 3})).cells
    parts = [shard_cells(cells, f"{i}/3") for i in (1, 2, 3)]
    assert sorted(c.name for part in parts for c in part) == sorted(c.name for c in cells)
    assert all(len(part) == 4 for part in parts)
    assert {c.optimizer for c in parts[0]} == {"adamw", "lion"}, "each shard a bit of everything"
    for bad in ("0/3", "4/3", "1-3", "a/b"):
        with pytest.raises(RecipeError, match="expected I/N"):
            shard_cells(cells, bad)


def test_two_concurrent_shards_run_every_cell_once_and_report_like_one_worker(
        tmp_path, tiny_bert, tiny_glue):
    top = {"lr_grid": {"points": 2}, "selection": {"split": "holdout"}}
    serial_calls: list[str] = []
    serial = tmp_path / "serial"
    serial.mkdir()
    with contextlib.redirect_stdout(io.StringIO()):
        expected = run_comparison(spec(serial, tiny_bert, tiny_glue, **top),
                                  run=fake_train(serial_calls))
    path = spec(tmp_path, tiny_bert, tiny_glue, **top)
    calls: list[str] = []
    slow = fake_train(calls)

    def slowly(cmd, log):
        time.sleep(0.05)
        return slow(cmd, log)

    results = {}

    def worker(shard):
        results[shard] = run_comparison(path, run=slowly, shard=shard)

    with contextlib.redirect_stdout(io.StringIO()):
        threads = [threading.Thread(target=worker, args=(s,)) for s in ("1/2", "2/2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # a third worker on every cell finds nothing left to do
        assert run_comparison(path, run=slowly)["failed"] is None
        final = report(tmp_path / "cmp")
    assert Counter(calls) == Counter(serial_calls) and max(Counter(calls).values()) == 1
    assert len(calls) == 8 and all(r["failed"] is None for r in results.values())
    assert final["selection"]["tasks"] == expected["selection"]["tasks"]
    assert [r["tasks"] for r in final["rows"]] == [r["tasks"] for r in expected["rows"]]
    assert not list((tmp_path / "cmp").glob("*/*/*.claim")), "every claim released"


def test_a_cell_held_by_another_worker_is_left_to_it(tmp_path, tiny_bert, tiny_glue, capsys):
    path = spec(tmp_path, tiny_bert, tiny_glue, seeds=[1])
    cell = plan(path).cells[0]
    claim_path(cell.dir).parent.mkdir(parents=True)
    claim_path(cell.dir).write_text(json.dumps({"owner": "other-host:1"}))
    calls: list[str] = []
    summary = run_comparison(path, run=fake_train(calls))
    assert summary["held"] == [cell.name] and calls == [plan(path).cells[1].name]
    assert f"{cell.name}: held by other-host:1; left to it" in capsys.readouterr().out
    assert summary["failed"] is None


# ---------------------------------------------------------------------------- records


def test_run_folders_of_earlier_versions_are_read(tmp_path):
    """Flat, prefixed final metrics and eval records (MNLI) as lrft wrote them before."""
    from lrft.compare import build_cell_record

    cell = tmp_path / "adamw" / "mnli" / "seed1"
    cell.mkdir(parents=True)
    final = {"validation_matched_accuracy": 0.80, "validation_mismatched_accuracy": 0.84,
             "validation_matched_eval_loss": 0.5}
    (cell / "results.json").write_text(json.dumps(
        {"status": "completed", "step": 4, "final": final, "main_metric":
         "validation_matched_accuracy", "train_time_s": 2.0}))
    evals = [{"kind": "eval", "step": s, "main_metric": "validation_matched_accuracy",
              "metrics": {"validation_matched_accuracy": a, "validation_mismatched_accuracy": a}}
             for s, a in ((2, 0.9), (4, 0.7))]  # results.json's final wins over the log's last
    (cell / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    (cell / "recipe.yaml").write_text("data: {glue_task: mnli}\noptim: {name: adamw}\n")
    record = build_cell_record(cell, "adamw", "mnli", 1)
    assert record["score"]["final"] == pytest.approx(0.82), "the GLUE score: mean of both splits"
    assert record["score"]["best"] == pytest.approx(0.9) and record["score"]["best_step"] == 2
    assert record["score"]["holdout"] is None
    assert record["metrics"]["final"] == {"matched_accuracy": 0.80, "mismatched_accuracy": 0.84}
