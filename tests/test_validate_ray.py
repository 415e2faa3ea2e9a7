"""hartkit validate --ray: a sweep sharded over a local Ray cluster (two CPUs, shared by the file) builds the
single-machine report; a worker killed mid-sweep and a driver stopped mid-sweep change nothing; bad input is
one clear error with the finished chunks kept. --samples on one machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import warnings

import numpy as np
import pytest

from hartkit.validate.core import DEFAULT_PROMPTS, sample_seed, validate
from hartkit.validate.report import report_dict

PROMPTS = list(DEFAULT_PROMPTS)  # three scene captions
SEEDS = [0]
SETTINGS = dict(prompts=PROMPTS, seeds=SEEDS, samples=2, fp16=True)

pytestmark = pytest.mark.usefixtures("one_thread")


def _same(a, b) -> None:
    """Two reports are the same report: every number, and every image bit for bit."""
    da, db = report_dict(a), report_dict(b)
    da.pop("created"), db.pop("created")
    assert da == db
    for ra, rb in zip(a.rows, b.rows):
        assert len(ra.images) == len(rb.images)
        assert all(np.array_equal(x, y) for x, y in zip(ra.images, rb.images))
    assert all(np.array_equal(x, y) for (x, _), (y, _) in zip(a.reference.fp32, b.reference.fp32))


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def bundle(onnx_bundle):
    return onnx_bundle[0]


@pytest.fixture(scope="module")
def baseline(bundle, tiny_checkpoint):
    """The single-machine report. BLAS on one thread, like the one-CPU Ray workers: numpy's float64 dot
    products (cosines) sum in another order on more threads, which moves their last bits."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with warnings.catch_warnings(), threadpoolctl.threadpool_limits(1):
        warnings.simplefilter("ignore")
        return validate([bundle], tiny_checkpoint, **SETTINGS)


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _sweep(bundle, checkpoint, out, **kw):
    from hartkit.validate.sweep import sweep

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sweep([bundle], checkpoint, out=out, chunk_size=1, progress=False, **SETTINGS, **kw)


def test_samples_score_k_images_per_prompt_and_seed(baseline):
    n = len(PROMPTS) * len(SEEDS) * 2
    assert baseline.reference.fp32_caption["n"] == n
    assert all(r.caption["n"] == n for r in baseline.rows if r.status == "ok")
    assert sample_seed(5, 0) == 5 and len({sample_seed(5, k) for k in range(4)}) == 4  # distinct extra seeds
    with pytest.raises(Exception, match="samples per prompt"):
        validate(["unused"], samples=0)


def test_sharded_sweep_builds_the_single_machine_report(cluster, bundle, tiny_checkpoint, baseline, tmp_path):
    result = _sweep(bundle, tiny_checkpoint, tmp_path / "out")
    _same(result.report, baseline)
    assert result.stats.workers == 2 and result.stats.chunks_skipped == 0
    keys = [k for line in _lines(result.results_path) for k in line["entries"]]
    assert len(keys) == len(set(keys))


def test_a_worker_killed_mid_sweep_is_retried_and_nothing_counts_twice(cluster, bundle, tiny_checkpoint, baseline,
                                                                       tmp_path):
    seen: list[dict] = []

    def kill_the_other(result: dict) -> None:
        seen.append(result)
        if len(seen) == 1:  # the other worker is busy with a queued task: kill its process
            victim = next(pid for pid in result["workers"] if pid != result["pid"])
            os.kill(victim, signal.SIGKILL)

    result = _sweep(bundle, tiny_checkpoint, tmp_path / "out", on_result=kill_the_other)
    first = set(seen[0]["workers"])
    assert any(r["pid"] not in first for r in seen)  # Ray restarted the killed actor and it ran tasks
    _same(result.report, baseline)
    keys = [k for line in _lines(result.results_path) for k in line["entries"]]
    assert len(keys) == len(set(keys))


def test_a_stopped_driver_resumes_from_the_results_file(cluster, bundle, tiny_checkpoint, baseline, tmp_path,
                                                        capsys):
    from hartkit.cli import main

    out = tmp_path / "out"
    done: list[dict] = []

    def stop_after_three(result: dict) -> None:
        done.append(result)
        if len(done) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _sweep(bundle, tiny_checkpoint, out, on_result=stop_after_three)
    results = out / "results.jsonl"
    assert len(_lines(results)) == 3
    with open(results, "a") as fh:
        fh.write('{"schema": "hartkit.validate.sweep/1", "entries": {"torn')  # killed mid-write
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    code = main(["validate", str(bundle), "--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts),
                 "--seeds", "0", "--samples", "2", "--ray", "--chunk", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0
    resumed = int(err.split(" chunks resumed")[0].rsplit("(", 1)[1])
    assert resumed >= 2  # the finished reference chunks at least were not run again
    data = json.loads((out / "report.json").read_text())
    expected = report_dict(baseline)
    data.pop("created"), expected.pop("created")
    assert data == json.loads(json.dumps(expected))


def test_bad_input_is_one_clear_error_and_keeps_finished_chunks(cluster, bundle, tiny_checkpoint, tmp_path):
    from hartkit.validate.sweep import SweepError, probe_address

    with pytest.raises(SweepError, match="cannot reach the Ray cluster at 127.0.0.1:9"):
        probe_address("127.0.0.1:9", timeout=5)
    with pytest.raises(SweepError, match=r"hartkit 0\.0\.0 on the driver but .* on node"):
        _sweep(bundle, tiny_checkpoint, tmp_path / "v", expect_version="0.0.0")

    moved = tmp_path / "bundle"
    shutil.copytree(bundle, moved)

    def unmount(result: dict) -> None:  # gone from the workers' view before any bundle task starts
        if moved.exists():
            moved.rename(tmp_path / "elsewhere")

    with pytest.raises(SweepError, match=r"bundle .* is not on worker node .* same path"):
        _sweep(moved, tiny_checkpoint, tmp_path / "out", on_result=unmount)
    assert _lines(tmp_path / "out" / "results.jsonl")  # what finished before the error is kept


def test_nothing_imports_ray_without_the_flag():
    import subprocess
    import sys

    code = ("import sys, hartkit.cli.validate, hartkit.validate.core, hartkit.validate.sweep\n"
            "assert 'ray' not in sys.modules, 'ray imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
