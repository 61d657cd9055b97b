"""Tests for spreading a comparison grid: SLURM (submitit), Ray, and concurrent --shard workers.

Every executor here trains real cells (the tiny BERT, 4 steps, in child processes as
`python -m lrft.train`) and must end with every cell trained exactly once and the same report as
the sequential run (`sequential`): scores, selection and loss curves equal, only timings and
memory differ. The SLURM path runs through submitit's local executor (the submission code is the
one sbatch gets; a stub `sbatch` checks the script it would submit). Ray runs on a local
instance limited to 2 CPUs. Interruptions: a SLURM task signalled as at its time limit requeues
and resumes its cell from a checkpoint; Ctrl-C on a Ray driver cancels cleanly and a rerun
resumes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import bert_recipe, write_recipe

from lrft.cli import main
from lrft.compare import report, run_comparison
from lrft.compare.claims import claim_path
from lrft.compare.executors import GroupRunner, cell_resources
from lrft.compare.load import load_comparison
from lrft.compare.spec import slurm_minutes

ROOT = Path(__file__).resolve().parents[1]
CELLS = [f"{opt}/sst2/seed{seed}" for opt in ("adamw", "lion") for seed in (1, 2)]
MEASURED = {"wall_time_s", "train_time_s", "samples_per_s", "peak_memory_bytes", "files",
            "command"}  # what may differ between two runs of the same cells
CPU_ONLY = ["cluster.gpus_per_process=0"]
# A driver whose Ctrl-C raises KeyboardInterrupt even when started from a shell that ignores
# SIGINT for background jobs.
DRIVER = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
          "from lrft.cli import main; sys.exit(main(sys.argv[1:]))")


def _spec(folder: Path, model: Path, glue: Path, *, seeds=(1, 2), max_steps: int = 4,
          optimizers: dict | None = None, **train) -> Path:
    """adamw vs lion x sst2 x seeds; `max_steps` steps a cell; output in folder/cmp."""
    folder.mkdir(parents=True, exist_ok=True)
    base = write_recipe(folder / "base.yaml", bert_recipe(model, glue, folder / "unused",
                                                          max_steps=max_steps, eval_steps=None,
                                                          **train))
    optimizers = optimizers or {"adamw": {"learning_rate": 3e-3},
                                "lion": {"name": "lion", "learning_rate": 3e-4,
                                         "weight_decay": 0.1}}
    return write_recipe(folder / "compare.yaml", {
        "base": base.name, "output_dir": str(folder / "cmp"), "tasks": ["sst2"],
        "seeds": list(seeds), "optimizers": optimizers})


def _attempts(cell_dir: Path) -> int:
    """How many times a training process was started for the cell (each start is logged)."""
    return (cell_dir / "train.log").read_text().count("-m lrft.train ")


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in MEASURED}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _assert_like_sequential(out: Path, expected: Path) -> None:
    """Every cell trained once, finished, unclaimed; the report and records as sequential's."""
    for name in CELLS:
        assert _attempts(out / name) == 1, f"{name} trained more than once"
        assert not claim_path(out / name).exists(), f"{name}: claim left behind"
        mine, theirs = (json.loads((d / name / "cell.json").read_text()) for d in (out, expected))
        assert _strip(mine) == _strip(theirs), name
    with contextlib.redirect_stdout(io.StringIO()):
        got = report(out)
    assert _strip(got) == _strip(json.loads((expected / "results.json").read_text()))


def _training_pids(folder: Path) -> list[int]:
    """Processes whose command line names `folder` (left-over training processes)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(folder) in (proc / "cmdline").read_bytes() \
                    .replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen | None = None,
                         timeout: float = 300) -> None:
    t0 = time.time()
    while not list(out.glob("*/*/seed*/checkpoint-*/lrft_state.json")):
        assert proc is None or proc.poll() is None, proc.communicate()[0]
        assert time.time() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Child processes (and Ray's workers, started after this) keep their datasets cache here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets-cache")))
        yield


@pytest.fixture(scope="module")
def sequential(env, tmp_path_factory, tiny_bert, tiny_glue) -> Path:
    """The grid run the plain way, one cell after another: the report every executor must match."""
    folder = tmp_path_factory.mktemp("sequential")
    with contextlib.redirect_stdout(io.StringIO()):
        assert run_comparison(_spec(folder, tiny_bert, tiny_glue))["failed"] is None
    return folder / "cmp"


@pytest.fixture(scope="module")
def ray_cluster(env):
    """A local Ray instance with 2 CPUs; its address, for drivers in other processes. What
    `ray.init` changes in this process (a SIGTERM handler, PYTHONBREAKPOINT) is put back."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e .[ray]")
    sigterm = signal.getsignal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONBREAKPOINT", os.environ.get("PYTHONBREAKPOINT", ""))
        ray.init(num_cpus=2, include_dashboard=False)
        yield ray.get_runtime_context().gcs_address
        ray.shutdown()
    signal.signal(signal.SIGTERM, sigterm)


# ---------------------------------------------------------------------------- what a cell asks


def test_a_cell_asks_for_its_launchers_processes_gpus_and_cpus(tmp_path, tiny_bert, tiny_glue):
    path = _spec(tmp_path, tiny_bert, tiny_glue)
    configs = ROOT / "accelerate_configs"

    def resources(*overrides):
        return cell_resources(load_comparison(path, list(overrides))[0])

    assert (resources().processes, resources().gpus, resources().cpus) == (1, 1, 1)
    eight = resources(f"launcher.config_file={configs / 'multi_gpu_8xa100.yaml'}",
                      "cluster.cpus_per_process=6")
    assert (eight.processes, eight.gpus, eight.cpus) == (8, 8, 48), "from the config file"
    two = resources(f"launcher.config_file={configs / 'multi_gpu_8xa100.yaml'}",
                    "launcher.num_processes=2", "cluster.gpus_per_process=2")
    assert (two.processes, two.gpus) == (2, 4), "launcher.num_processes wins"
    cpu = resources(f"launcher.config_file={configs / 'cpu.yaml'}")
    assert (cpu.processes, cpu.gpus) == (1, 0), "a CPU launcher config asks for no GPU"
    with pytest.raises(Exception, match="spans 2 machines.*one node"):
        resources(f"launcher.config_file={configs / 'multi_node.yaml'}")


def test_cluster_keys_are_checked_with_the_rest_of_the_spec(tmp_path, tiny_bert, tiny_glue):
    from lrft.errors import RecipeError

    path = _spec(tmp_path, tiny_bert, tiny_glue)
    with pytest.raises(RecipeError) as info:
        load_comparison(path, ["cluster.time_min=0", "cluster.gpus_per_process=-1",
                               "cluster.cpus_per_process=0", "cluster.partiton=gpu",
                               "cluster.account=''"])
    problems = "\n".join(info.value.problems)
    for expected in ("cluster.time_min: 0 must be >= 1", "cluster.gpus_per_process: -1",
                     "cluster.cpus_per_process: 0", "did you mean 'partition'?",
                     "cluster.account: empty"):
        assert expected in problems
    c, _ = load_comparison(path, ["cluster.partition=gpu", "cluster.time_min=90"])
    assert (c.cluster.partition, c.cluster.time_min, c.cluster.account) == ("gpu", 90, None)


def test_time_limits_read_every_sbatch_form():
    assert [slurm_minutes(t) for t in ("240", "4:00:00", "90:00", "2:30", "1-00:00:00", "1-12",
                                       "1-2:30", "0:0:30")] == [240, 240, 90, 3, 1440, 2160,
                                                                1590, 1]
    for bad in ("1h", "", "0", "-1", "1:2:3:4", "a-1"):
        with pytest.raises(ValueError):
            slurm_minutes(bad)


def test_cluster_flags_become_cluster_keys_and_need_their_executor(tmp_path, tiny_bert, tiny_glue,
                                                                  capsys):
    path = _spec(tmp_path, tiny_bert, tiny_glue)
    assert main(["compare", str(path), "--gpus", "0"]) == 2
    assert "--gpus applies to --executor slurm | ray" in capsys.readouterr().err
    assert main(["compare", str(path), "--executor", "ray", "--partition", "gpu"]) == 2
    assert "--partition applies to --executor slurm" in capsys.readouterr().err
    assert main(["compare", str(path), "--executor", "slurm", "--time", "4h"]) == 2
    assert "--time '4h': expected minutes or SLURM's [D-]HH:MM:SS" in capsys.readouterr().err


@pytest.mark.parametrize("executor,module", [("slurm", "submitit"), ("ray", "ray")])
def test_a_missing_engine_names_its_extra_before_anything_is_written(
        tmp_path, tiny_bert, tiny_glue, monkeypatch, capsys, executor, module):
    path = _spec(tmp_path, tiny_bert, tiny_glue)
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert main(["compare", str(path), "--executor", executor]) == 2
    err = capsys.readouterr().err
    assert f"--executor {executor} needs {module}" in err and f'pip install -e ".[{executor}]"' \
        in err
    assert not (tmp_path / "cmp").exists()


def test_lrft_help_imports_no_engine():
    code = ("import sys\nfrom lrft.cli import main\ntry:\n    main(['compare', '--help'])\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('ray', 'submitit', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout
    assert "--executor {local,slurm,ray}" in out and out.strip().endswith("[]")


def test_stopping_a_runner_ends_the_whole_training_group(tmp_path):
    """accelerate launch starts the training processes: a stop must reach them too."""
    marker = tmp_path / "grandchild.pid"
    code = (f"import subprocess, sys, time, pathlib\n"
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"pathlib.Path({str(marker)!r}).write_text(str(p.pid))\ntime.sleep(120)")
    runner, codes = GroupRunner(), []
    thread = threading.Thread(target=lambda: codes.append(
        runner([sys.executable, "-c", code], tmp_path / "train.log")))
    thread.start()
    t0 = time.time()
    while not marker.exists() or not marker.read_text():
        assert time.time() - t0 < 60
        time.sleep(0.05)
    grandchild = int(marker.read_text())
    runner.stop()
    thread.join(30)
    assert codes == [-signal.SIGTERM]
    t0 = time.time()
    while Path(f"/proc/{grandchild}").exists() and time.time() - t0 < 10:
        time.sleep(0.05)  # the grandchild is reaped by init once gone
    assert not Path(f"/proc/{grandchild}").exists() or \
        "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]
    assert (tmp_path / "train.log").read_text().startswith(f"$ {sys.executable} -c ")


# ---------------------------------------------------------------------------- SLURM (submitit)


def _stub_slurm(folder: Path) -> Path:
    """`sbatch` that keeps the script it is given and answers like SLURM; `srun` that exists."""
    folder.mkdir()
    (folder / "sbatch").write_text('#!/bin/sh\ncp "$1" "$(dirname "$0")/submitted.sh"\n'
                                   'echo "Submitted batch job 4242"\n')
    (folder / "srun").write_text("#!/bin/sh\nexit 0\n")
    for name in ("sbatch", "srun"):
        (folder / name).chmod(0o755)
    return folder


def test_slurm_submits_one_array_asking_for_each_cells_resources(tmp_path, tiny_bert, tiny_glue,
                                                                 monkeypatch, capsys):
    pytest.importorskip("submitit", reason="the slurm extra is not installed: pip install -e "
                                           ".[slurm]")
    path = _spec(tmp_path, tiny_bert, tiny_glue)
    system_path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert main(["compare", str(path), "--executor", "slurm"]) == 2
    assert "no SLURM here (sbatch and srun are not on PATH)" in capsys.readouterr().err

    bin_dir = _stub_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{system_path}")
    config = ROOT / "accelerate_configs" / "multi_gpu_8xa100.yaml"
    assert main(["compare", str(path), "--executor", "slurm", "--partition", "gpu", "--account",
                 "proj", "--time", "1:30:00", "--cpus", "4", f"launcher.config_file={config}",
                 "launcher.num_processes=2", "seeds=[1]"]) == 0
    script = (bin_dir / "submitted.sh").read_text().splitlines()
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --time=90", "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --signal=USR2@90"):
        assert line in script
    out = capsys.readouterr().out
    logs = tmp_path / "cmp" / "slurm"
    assert "submitted 2 cell(s) as SLURM job array 4242 (tasks 4242_0..4242_1)" in out
    assert "2 process(es), 2 GPU(s), 8 CPU(s); partition gpu, account proj; time limit 90 min" \
        in out
    assert f"squeue -j 4242    logs: {logs}/4242_<task>_0_log.out" in out
    assert "scancel 4242" in out and f"lrft compare --report {tmp_path / 'cmp'}" in out
    rows = [line.split("\t") for line in (logs / "jobs.tsv").read_text().splitlines()]
    assert [r[:2] for r in rows] == [["4242_0", "adamw/sst2/seed1"], ["4242_1", "lion/sst2/seed1"]]


def test_slurm_array_through_submitits_local_executor_runs_each_cell_once(
        env, sequential, tmp_path, tiny_bert, tiny_glue, capsys):
    """Submitted twice at once: claims make the double submission harmless."""
    pytest.importorskip("submitit", reason="the slurm extra is not installed: pip install -e "
                                           ".[slurm]")
    from lrft.compare.slurm import submit_slurm

    path = _spec(tmp_path, tiny_bert, tiny_glue)
    first = submit_slurm(path, CPU_ONLY, cluster="local")
    second = submit_slurm(path, CPU_ONLY, cluster="local")
    assert len(first) == len(second) == 4
    outcomes = [job.result() for job in first + second]  # raises if a task failed
    assert sorted(o.cell.name for o in outcomes if o.status == "finished") == sorted(CELLS)
    assert {o.status for o in outcomes} <= {"finished", "held", "skipped"}
    _assert_like_sequential(tmp_path / "cmp", sequential)
    capsys.readouterr()
    assert submit_slurm(path, CPU_ONLY, cluster="local") == []
    assert "nothing to submit: every cell is finished" in capsys.readouterr().out


def test_a_slurm_task_at_its_time_limit_requeues_and_resumes_its_cell(env, tmp_path, tiny_bert,
                                                                      tiny_glue):
    pytest.importorskip("submitit", reason="the slurm extra is not installed: pip install -e "
                                           ".[slurm]")
    from lrft.compare.slurm import submit_slurm

    path = _spec(tmp_path, tiny_bert, tiny_glue, seeds=(1,), max_steps=200, save_steps=10,
                 optimizers={"adamw": {"learning_rate": 3e-3}})
    with contextlib.redirect_stdout(io.StringIO()):
        (job,) = submit_slurm(path, CPU_ONLY, cluster="local")
    cell = tmp_path / "cmp" / "adamw" / "sst2" / "seed1"
    _wait_for_checkpoint(tmp_path / "cmp")
    owner = json.loads(claim_path(cell).read_text())["owner"]
    os.kill(int(owner.rpartition(":")[2]), signal.SIGUSR2)  # what SLURM sends 90 s ahead
    assert job.result().status == "finished"
    log = job.stdout()
    assert "stopped for a requeue" in log and "Requeued job" in log
    assert "adamw/sst2/seed1: resuming from checkpoint-" in log
    assert _attempts(cell) == 2 and "resumed from" in (cell / "train.log").read_text()
    steps = [r["step"] for r in map(json.loads, (cell / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == list(range(1, 201)), "one clean curve: the resume cut the log back"
    assert not claim_path(cell).exists()


# ---------------------------------------------------------------------------- Ray


def test_ray_runs_each_cell_once_as_cells_finish(ray_cluster, sequential, tmp_path, tiny_bert,
                                                 tiny_glue, capsys):
    from lrft.compare.ray_exec import run_on_ray

    summary = run_on_ray(_spec(tmp_path, tiny_bert, tiny_glue), CPU_ONLY)
    assert summary["failed"] is None and summary["failures"] == [] and summary["held"] == []
    out = capsys.readouterr().out
    assert "Ray: 4 task(s), each 1 process(es), 0 GPU(s), 1 CPU(s); the cluster has 2 CPU(s)" \
        in out
    assert all(f"[{k}/4 done]" in out for k in (1, 2, 3, 4))
    _assert_like_sequential(tmp_path / "cmp", sequential)


def test_ctrl_c_on_a_ray_driver_cancels_cleanly_and_a_rerun_resumes(ray_cluster, tmp_path,
                                                                    tiny_bert, tiny_glue, capsys):
    from lrft.compare.ray_exec import run_on_ray

    # 600 steps: room for the cancel to land while both cells still train
    path = _spec(tmp_path, tiny_bert, tiny_glue, max_steps=600, save_steps=10,
                 optimizers={"adamw": {"learning_rate": 3e-3}})
    out = tmp_path / "cmp"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, "compare", str(path), "--executor", "ray", "--gpus", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "RAY_ADDRESS": ray_cluster})
    _wait_for_checkpoint(out, driver)
    driver.send_signal(signal.SIGINT)
    printed = driver.communicate(timeout=180)[0]
    assert driver.returncode == 130, printed
    assert "interrupted: cancelling" in printed and "claims were released" in printed
    assert f"lrft compare {path} cluster.gpus_per_process=0 --executor ray" in printed
    assert not list(out.glob("*/*/*.claim")), "every claim released"
    t0 = time.time()
    while _training_pids(out) and time.time() - t0 < 30:
        time.sleep(0.2)
    assert _training_pids(out) == [], "no training process outlives the cancel"
    interrupted = [d for d in out.glob("*/*/seed*") if not (d / "results.json").exists()]
    assert interrupted, "the Ctrl-C came before the cells finished"

    summary = run_on_ray(path, CPU_ONLY)  # the rerun, on the same Ray cluster
    assert summary["failed"] is None
    for seed in (1, 2):
        cell = out / "adamw" / "sst2" / f"seed{seed}"
        log = (cell / "train.log").read_text()
        assert _attempts(cell) <= 2 and log.count("saved model and results") == 1
        steps = [r["step"] for r in map(json.loads, (cell / "metrics.jsonl").read_text()
                                        .splitlines()) if r["kind"] == "train"]
        assert steps == list(range(1, 601))
    assert "resumed from" in "".join((d / "train.log").read_text() for d in interrupted)
    assert "[2/2 done]" in capsys.readouterr().out


# ---------------------------------------------------------------------------- shards


def test_two_shard_workers_and_a_whole_grid_worker_at_once_run_each_cell_once(
        env, sequential, tmp_path, tiny_bert, tiny_glue):
    """Three `lrft compare` processes on one folder: shards 1/2 and 2/2, and one on every cell."""
    path = _spec(tmp_path, tiny_bert, tiny_glue)
    workers = [subprocess.Popen([sys.executable, "-m", "lrft.cli", "compare", str(path), *shard],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=tmp_path)
               for shard in (["--shard", "1/2"], ["--shard", "2/2"], [])]
    printed = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], printed
    _assert_like_sequential(tmp_path / "cmp", sequential)
