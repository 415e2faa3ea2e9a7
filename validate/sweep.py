"""``hartkit validate --ray``: the same validation, sharded over a Ray cluster.

The work is split into tasks that Ray actors run (:class:`SweepWorker`, one per CPU slot; each loads the
torch references once and a pipeline once per (bundle, backend), and keeps them):

- ``record``: the fp32 reference on the first :data:`~hartkit.validate.core.RECORD_RUNS` runs with every
  graph's inputs recorded (what the per-graph scores run on), once per sweep;
- ``reference`` per prompt chunk: the fp32 reference runs (images, traces, logits: the teacher) and the fp16
  row's runs; the driver puts each chunk into Ray's object store once and every bundle's chunk task reads it
  from there, so the reference of a prompt is computed once and shared by every bundle;
- ``graphs`` per row: the recorded inputs through the row's backend;
- ``row`` per (bundle, backend, prompt chunk): per-run records (:class:`~hartkit.validate.core.RunRecord`).

The driver pools the records exactly as one machine does (:func:`~hartkit.validate.core.finish_row`,
:func:`~hartkit.validate.core.assemble_report`), so the report is the single-machine report for the same
prompts and seeds.

Faults: actors restart and retry their running task (Ray's ``max_restarts`` / ``max_task_retries``); every
finished task's records are appended to ``OUT/results.jsonl`` as one line, keyed per run by a content hash
(bundle manifest, which pins every file's sha256; checkpoint files; prompt; seed; settings), so a re-run of the
same command skips what is there and a record is never counted twice. Bundles and the checkpoint reach the
workers **by path**: they must be on storage every node mounts at the same path (a bundle is GBs; each worker
reads it once per sweep, where the object store would copy it through the driver to every node).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from hartkit import __version__
from hartkit.errors import HartkitError, MissingDependencyError, UsageError
from hartkit.validate import core as C

RESULTS_NAME = "results.jsonl"
RESULTS_SCHEMA = "hartkit.validate.sweep/1"
DEFAULT_CHUNK = 4  # prompts per task: small enough to spread, large enough to amortise a task's overhead
FP16_LABEL = "torch (fp16 autocast)"
CONNECT_TIMEOUT_S = 10.0


class SweepError(HartkitError):
    """A sweep that cannot go on (cluster unreachable, a bundle missing on a worker, versions differ)."""


# ----------------------------------------------------------------------------- the results file


def _enc(x: Any) -> Any:
    """JSON-ready: arrays as base64 ``.npy`` (read back without pickle), numpy scalars as numbers."""
    if isinstance(x, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, x, allow_pickle=False)
        return {"__npy__": base64.b64encode(buf.getvalue()).decode("ascii")}
    if isinstance(x, dict):
        return {str(k): _enc(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_enc(v) for v in x]
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


def _dec(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {"__npy__"}:
            return np.load(io.BytesIO(base64.b64decode(x["__npy__"])), allow_pickle=False)
        return {k: _dec(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_dec(v) for v in x]
    return x


def record_to_json(rec: C.RunRecord) -> dict:
    return {"run": dict(rec.run.__dict__), "image": rec.image, "kl": rec.kl, "top1": rec.top1, "topk": rec.topk,
            "tokens": rec.tokens, "logit_err": rec.logit_err, "kl_worst": rec.kl_worst, "captions": rec.captions}


def record_from_json(d: dict) -> C.RunRecord:
    return C.RunRecord(C.RunScore(**d["run"]), d["image"], d["kl"], d["top1"], d["topk"], d["tokens"],
                       d["logit_err"], d["kl_worst"], d["captions"])


def graph_from_json(d: dict) -> C.GraphScore:
    return C.GraphScore(**d)


class ResultsFile:
    """Append-only JSON lines, one per finished task; a torn last line (a killed driver) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict] = {}  # key -> entry (first wins: nothing counted twice)
        self.torn = 0
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    self.torn += 1
                    continue
                if not isinstance(item, dict) or item.get("schema") != RESULTS_SCHEMA:
                    self.torn += 1
                    continue
                for key, value in item.get("entries", {}).items():
                    self.entries.setdefault(key, _dec(value))

    def has(self, key: str) -> bool:
        return key in self.entries

    def append(self, entries: Mapping[str, Any]) -> None:
        new = {k: v for k, v in entries.items() if k not in self.entries}
        if not new:
            return
        enc = _enc(new)
        line = json.dumps({"schema": RESULTS_SCHEMA, "entries": enc}) + "\n"
        with open(self.path, "a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell():  # a torn line from a killed driver stays on its own line
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            fh.write(line.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        self.entries.update(_dec(json.loads(json.dumps(enc))))  # exactly as a resumed driver reads them back


# ----------------------------------------------------------------------------- keys


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def folder_digest(folder: Path) -> str:
    """Content hash of every file in a folder (the checkpoint and text model the references load)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def bundle_digest(folder: Path) -> str:
    """A bundle's content hash: its manifest, which pins the sha256 of every file (workers verify them)."""
    from hartkit.bundle.read import manifest_bytes

    return hashlib.sha256(manifest_bytes(folder)).hexdigest()


# ----------------------------------------------------------------------------- the worker


def _node() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - only a label for messages
        return socket.gethostname()


def _trace_payload(trace) -> dict:
    return {"tokens": [np.asarray(t) for t in trace.tokens], "latents": [np.asarray(t) for t in trace.latents],
            "residual": trace.residual}


def _trace(payload: dict):
    from hartkit.loop.sampler import Trace

    return Trace(tokens=list(payload["tokens"]), latents=list(payload.get("latents", [])),
                 residual=payload.get("residual"))


class SweepWorker:
    """A Ray actor's state: the references (loaded once) and one pipeline per (bundle, backend)."""

    def __init__(self, checkpoint: str, text_model: str | None, graph_backends: Mapping[str, str] | None,
                 explicit_backend: bool) -> None:
        self.checkpoint, self.text_model = checkpoint, text_model
        self.graph_backends = dict(graph_backends) if graph_backends else None
        self.explicit_backend = explicit_backend
        self._refs = None
        self._cands: dict[tuple, Any] = {}
        self._verified: dict[str, Any] = {}

    def hello(self) -> dict:
        return {"version": __version__, "node": _node(), "pid": os.getpid()}

    @property
    def refs(self):
        if self._refs is None:
            from hartkit.validate.references import References

            self._refs = References(self.checkpoint, self.text_model)
        return self._refs

    def _candidate(self, plan: C.CandidatePlan):
        key = (str(plan.folder), plan.format, plan.backend)
        if key not in self._cands:
            from hartkit.bundle import MANIFEST, read_manifest, verify_bundle

            if not (plan.folder / MANIFEST).is_file():
                raise SweepError(f"bundle {plan.folder} is not on worker node {_node()}: bundles reach the workers "
                                 "by path, so put them on storage every node mounts at the same path")
            folder = str(plan.folder)
            if folder not in self._verified:
                self.refs.check_bundle(plan.folder, read_manifest(plan.folder))
                self._verified[folder] = verify_bundle(plan.folder)
            report = self._verified[folder]
            self._cands[key] = C.open_candidate(plan, report.ok, report.problems, self.explicit_backend,
                                                self.graph_backends)
        return self._cands[key]

    def run(self, task: dict, payload: Any = None) -> dict:
        """One task; every failure comes back as ``{"fatal": message}`` (Ray errors are for dead workers)."""
        try:
            return {"id": task["id"], "pid": os.getpid(), **getattr(self, "_" + task["kind"])(task, payload)}
        except HartkitError as exc:
            return {"id": task["id"], "pid": os.getpid(), "fatal": str(exc)}
        except Exception as exc:  # noqa: BLE001 - reported with the task and node, the sweep stops cleanly
            return {"id": task["id"], "pid": os.getpid(),
                    "fatal": f"{task['kind']} task on node {_node()}: {type(exc).__name__}: {exc}"}

    def _record(self, task: dict, payload: Any) -> dict:
        refs = self.refs
        cfg = refs.loop.default_cfg if task["cfg"] is None else task["cfg"]
        recorded, _ = C.record_graph_inputs(refs, [tuple(r) for r in task["runs"]], cfg, task["budget"])
        meta = {"cfg": cfg, "loop": refs.info["loop"], "output_names": refs.output_names,
                "checkpoint": str(refs.checkpoint), "text_model": str(refs.text_model)}
        return {"recorded": recorded, "meta": meta}

    def _reference(self, task: dict, payload: Any) -> dict:
        refs = self.refs
        cfg = refs.loop.default_cfg if task["cfg"] is None else task["cfg"]
        samples = task["samples"]
        out = []
        for prompt, seed in task["runs"]:
            logits: list[np.ndarray] = []
            image, trace = refs.fp32.generate(prompt, seed=seed, cfg=cfg, callback_on_stage_end=C.keep_logits(logits))
            captions = C.reference_samples(refs.fp32, prompt, seed, cfg, samples, image)
            item = {"image": image, "trace": _trace_payload(trace), "logits": logits, "captions": captions,
                    "fp16": None}
            if task["fp16"]:
                rec = C.score_run(refs.fp16, refs.loop, prompt, seed, cfg, task["topk"], image, trace, logits,
                                  is_reference=True, samples=samples)
                item["fp16"] = rec
            out.append(item)
        return {"runs": out, "cfg": cfg, "fallbacks": dict(refs.fp16_backend.fallbacks)}

    def _graphs(self, task: dict, recorded: Any) -> dict:
        refs = self.refs
        if task["plan"] is None:  # the fp16 reference row
            backend = refs.fp16_backend
        else:
            cand = self._candidate(task["plan"])
            if cand.pipeline is None:
                return {"status": cand.row.status, "reason": cand.row.reason}
            backend = cand.pipeline.backend
        graphs = C.score_graphs(backend, recorded, refs.output_names)
        return {"status": "ok", "reason": "", "graphs": graphs, "fallbacks": dict(refs.fp16_backend.fallbacks)}

    def _row(self, task: dict, chunk: dict) -> dict:
        cand = self._candidate(task["plan"])
        if cand.pipeline is None:
            return {"status": cand.row.status, "reason": cand.row.reason}
        refs = self.refs
        records = []
        for (prompt, seed), item in zip(task["runs"], chunk["runs"]):
            fp16 = item["fp16"].image if item["fp16"] is not None else None
            try:
                records.append(C.score_run(cand.pipeline, refs.loop, prompt, seed, chunk["cfg"], task["topk"],
                                           item["image"], _trace(item["trace"]), item["logits"], fp16,
                                           samples=task["samples"]))
            except C.GenerationFailed as exc:
                return {"status": "ok", "failed": str(exc), "records": records}
        return {"status": "ok", "records": records}


# ----------------------------------------------------------------------------- the driver


@dataclass
class _RemoteReferences:
    """What the report needs of :class:`~hartkit.validate.references.References`, from a worker."""

    checkpoint: Path
    text_model: Path
    loop: Any
    output_names: dict


@dataclass
class SweepStats:
    tasks_total: int = 0
    tasks_run: int = 0
    chunks_skipped: int = 0  # (row or reference, chunk) pairs found finished in the results file
    workers: int = 0
    seconds: float = 0.0
    runs_scored: int = 0  # (row, prompt, seed) scored by this driver (not resumed)


@dataclass
class SweepResult:
    report: C.ValidationReport
    stats: SweepStats
    results_path: Path


def probe_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse an unreachable cluster in seconds (``ray.init`` retries for minutes before it gives up)."""
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray {address!r}: expected HOST:PORT of the head node (e.g. 10.0.0.1:6379), "
                         "ray://HOST:PORT, or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise SweepError(f"cannot reach the Ray cluster at {address}: {exc} (is `ray start --head` running there, "
                         "and the port open?)") from None


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """``ray.init`` on ``address`` (None: a local cluster on this machine), unless already connected."""
    import ray

    if ray.is_initialized():
        return
    if address is not None:
        probe_address(address)
    kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
    if address is None and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise SweepError(f"cannot connect to the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None


def _chunks(prompts: Sequence[str], seeds: Sequence[int], size: int) -> list[list[tuple[str, int]]]:
    return [[(p, s) for p in prompts[i:i + size] for s in seeds] for i in range(0, len(prompts), size)]


def sweep(bundles: Sequence[str | Path], checkpoint: str | Path | None = None, *,
          text_model: str | Path | None = None, backend: str | None = None,
          graph_backends: Mapping[str, str] | None = None, prompts: Sequence[str] = C.DEFAULT_PROMPTS,
          seeds: Sequence[int] = C.DEFAULT_SEEDS, cfg: float | None = None,
          thresholds: Mapping[str, object] | None = None, fp16: bool = True, topk: int = C.TOPK,
          samples: int = 1, out: str | Path = "hartkit-validate", address: str | None = None,
          workers: int | None = None, chunk_size: int = DEFAULT_CHUNK, max_retries: int = 3,
          record_budget_mb: float = C.RECORD_BUDGET_MB, progress: bool = True,
          on_result: Callable[[dict], None] | None = None, expect_version: str = __version__) -> SweepResult:
    """:func:`hartkit.validate.core.validate` over a Ray cluster; resumes from ``out/results.jsonl``.

    ``address``: a running cluster (``HOST:PORT`` of ``ray start --head``, ``ray://...`` or ``auto``); None starts
    a local one. ``workers``: actors (default: one per CPU of the cluster). ``on_result(result)`` is called on the
    driver for every finished task (tests use it to kill workers or stop the driver).
    """
    from hartkit.fsutil import make_dir

    samples = C.check_samples(samples)
    if chunk_size < 1:
        raise UsageError(f"--chunk takes a number of prompts >= 1, got {chunk_size}")
    if not prompts:
        raise UsageError("no prompts to validate on")
    bars = C.resolve(thresholds)
    if not bundles:
        raise UsageError("give at least one bundle to validate")
    if checkpoint is None:
        checkpoint, text_model = C.checkpoint_from_manifests(bundles, text_model)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise UsageError(f"{checkpoint}: checkpoint folder not found")
    from hartkit.validate.references import text_model_dir

    text_model = text_model_dir(checkpoint, text_model)
    planned = C.plan_candidates(bundles, backend)
    plans = [p for _, _, ps in planned for p in ps]
    out = make_dir(out)
    results = ResultsFile(out / RESULTS_NAME)

    prompts, seeds = list(prompts), list(seeds)
    chunks = _chunks(prompts, seeds, chunk_size)
    runs = [r for c in chunks for r in c]
    gb = dict(sorted(graph_backends.items())) if graph_backends else None
    base = _digest("reference", __version__, folder_digest(checkpoint),
                   "" if checkpoint.resolve() in text_model.resolve().parents else folder_digest(text_model), cfg,
                   samples, topk,
                   fp16)
    rkey = {r: _digest(base, r[0], r[1]) for r in runs}
    bdig = {str(p.folder): bundle_digest(p.folder) for p in plans}
    row_ids = (["fp16"] if fp16 else []) + [p.label for p in plans]
    row_base = {"fp16": _digest(base, "fp16")}
    row_base.update({p.label: _digest(base, "row", bdig[str(p.folder)], p.format, p.backend, gb) for p in plans})
    record_key = _digest(base, "record", runs[:C.RECORD_RUNS], record_budget_mb)
    gkey = {rid: _digest(row_base[rid], "graphs", record_key) for rid in row_ids}
    runkey = {(rid, r): _digest(row_base[rid], rkey[r]) for rid in row_ids if rid != "fp16" for r in runs}
    plan_of = {p.label: p for p in plans}

    def ref_done(chunk) -> bool:
        return all(results.has(rkey[r]) for r in chunk)

    def row_done(rid, chunk) -> bool:
        return all(results.has(runkey[(rid, r)]) for r in chunk)

    def row_closed(rid) -> bool:
        """A row whose graphs task said it cannot run (skipped/error): its chunks are not run."""
        g = results.entries.get(gkey[rid])
        return g is not None and g["status"] != "ok"

    stats = SweepStats()
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as exc:
        raise MissingDependencyError(f"--ray needs Ray: pip install 'hartkit[ray]' ({exc})") from None

    connect(address, num_cpus=workers)
    n_workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    remote = ray.remote(SweepWorker).options(num_cpus=1, max_restarts=max_retries, max_task_retries=max_retries)
    actors = [remote.remote(str(checkpoint), str(text_model), gb, backend is not None) for _ in range(n_workers)]
    stats.workers = n_workers
    pool = ActorPool(actors)

    tasks: dict[int, dict] = {}
    ref_payload: dict[int, Any] = {}  # chunk index -> object ref of the reference chunk (the teacher)
    waiting: dict[int, list[str]] = {}  # chunk index -> rows whose chunk task waits for that reference
    pending: dict[int, int] = {}  # chunk index -> row tasks still reading that reference

    queued: list[tuple[dict, Any]] = []  # the first tasks wait for the version check
    started: list[bool] = []

    def submit(task: dict, payload: Any = None) -> None:
        task["id"] = len(tasks)
        tasks[task["id"]] = task
        stats.tasks_total += 1
        if queued or not started:
            queued.append((task, payload))
        else:
            pool.submit(lambda a, t: a.run.remote(t[0], t[1]), (task, payload))

    def units(task: dict) -> int:
        return len(task.get("runs", ())) * (2 if task["kind"] == "reference" and fp16 else 1) or 1

    need_graphs = [rid for rid in row_ids if not results.has(gkey[rid])]
    need_rows = {ci: [rid for rid in row_ids if rid != "fp16" and not row_closed(rid) and not row_done(rid, c)]
                 for ci, c in enumerate(chunks)}
    meta = results.entries.get(record_key)
    if need_graphs or meta is None:
        submit({"kind": "record", "runs": runs[:C.RECORD_RUNS], "cfg": cfg,
                "budget": int(record_budget_mb * 2**20)})
    for ci, chunk in enumerate(chunks):
        stats.chunks_skipped += sum(row_done(rid, chunk) for rid in row_ids if rid != "fp16") + ref_done(chunk)
        if not ref_done(chunk) or need_rows[ci]:
            submit({"kind": "reference", "chunk": ci, "runs": chunk, "cfg": cfg, "samples": samples, "fp16": fp16,
                    "topk": topk})
            waiting[ci] = list(need_rows[ci])

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(units(t) for t in tasks.values()), desc=f"validating on {n_workers} Ray workers",
                   unit="run", dynamic_ncols=True)
    t0 = time.perf_counter()
    failures: dict[str, tuple[tuple, str]] = {}  # row -> (first failing run, message)
    fallbacks: dict[str, str] = {}
    try:
        hellos = ray.get([a.hello.remote() for a in actors])
        other = sorted({f"{h['version']} on node {h['node']}" for h in hellos if h["version"] != expect_version})
        if other:
            raise SweepError(f"hartkit {expect_version} on the driver but {', '.join(other)}: install the same "
                             "hartkit on every node")
        for task, payload in queued:
            pool.submit(lambda a, t: a.run.remote(t[0], t[1]), (task, payload))
        queued.clear()
        started.append(True)
        while pool.has_next():
            try:
                result = pool.get_next_unordered()
            except ray.exceptions.RayError as exc:
                raise SweepError(f"a Ray worker failed {max_retries + 1} times in a row; finished chunks are kept in "
                                 f"{results.path}: {str(exc).splitlines()[0]}") from None
            task = tasks[result["id"]]
            stats.tasks_run += 1
            if "fatal" in result:
                raise SweepError(f"{result['fatal']} (finished chunks are kept in {results.path}; "
                                 "re-run the same command to resume)")
            kind = task["kind"]
            if kind == "record":
                counts = {g: len(c) for g, c in result["recorded"].items()}
                results.append({record_key: {"meta": result["meta"], "counts": counts}})
                meta = results.entries[record_key]
                recorded = ray.put(result["recorded"])
                for rid in need_graphs:
                    submit({"kind": "graphs", "row": rid, "plan": plan_of.get(rid)}, recorded)
                    if bar is not None:
                        bar.total += 1
            elif kind == "reference":
                ci = task["chunk"]
                for k, v in result["fallbacks"].items():
                    fallbacks.setdefault(k, v)
                entries = {}
                for r, item in zip(task["runs"], result["runs"]):
                    entries[rkey[tuple(r)]] = {
                        "image": item["image"], "tokens": item["trace"]["tokens"], "captions": item["captions"],
                        "fp16": record_to_json(item["fp16"]) if item["fp16"] is not None else None}
                results.append(entries)
                rows_here = [rid for rid in waiting.pop(ci, []) if not row_closed(rid)]
                if rows_here:
                    ref_payload[ci] = ray.put({"runs": result["runs"], "cfg": result["cfg"]})
                    pending[ci] = len(rows_here)
                    for rid in rows_here:
                        submit({"kind": "row", "row": rid, "plan": plan_of[rid], "chunk": ci, "runs": task["runs"],
                                "samples": samples, "topk": topk}, ref_payload[ci])
                        if bar is not None:
                            bar.total += units(tasks[len(tasks) - 1])
            elif kind == "graphs":
                rid = task["row"]
                for k, v in result.get("fallbacks", {}).items():
                    fallbacks.setdefault(k, v)
                results.append({gkey[rid]: {"status": result["status"], "reason": result["reason"],
                                            "graphs": [dict(g.__dict__) for g in result.get("graphs", [])]}})
            elif kind == "row":
                rid = task["row"]
                if result["status"] == "ok":
                    results.append({runkey[(rid, tuple(r))]: record_to_json(rec)
                                    for r, rec in zip(task["runs"], result["records"])})
                    if "failed" in result:
                        failed_run = tuple(task["runs"][len(result["records"])])
                        idx = runs.index(failed_run)
                        if rid not in failures or idx < runs.index(failures[rid][0]):
                            failures[rid] = (failed_run, result["failed"])
                stats.runs_scored += len(result.get("records", []))
                pending[task["chunk"]] -= 1
                if not pending[task["chunk"]]:  # every row has it: the object store may drop the teacher
                    del ref_payload[task["chunk"]]
            if bar is not None:
                bar.update(units(task))
                elapsed = time.perf_counter() - t0
                bar.set_postfix_str(f"{stats.tasks_run}/{stats.tasks_total} tasks, "
                                    f"{stats.runs_scored / max(elapsed, 1e-9):.2f} bundle runs/s")
            if on_result is not None:
                on_result({"kind": kind, "pid": result["pid"], "workers": [h["pid"] for h in hellos],
                           **{k: v for k, v in task.items() if k in ("chunk", "row")}})
    finally:
        if bar is not None:
            bar.close()
        for a in actors:
            ray.kill(a, no_restart=True)
    stats.seconds = time.perf_counter() - t0
    report = _assemble(results, planned=plans, row_ids=row_ids, runs=runs, prompts=prompts, seeds=seeds, topk=topk,
                       samples=samples, bars=bars, rkey=rkey, gkey=gkey, runkey=runkey, record_key=record_key,
                       failures=failures, fallbacks=fallbacks, fp16=fp16)
    return SweepResult(report, stats, results.path)


def _assemble(results: ResultsFile, *, planned, row_ids, runs, prompts, seeds, topk, samples, bars, rkey, gkey, runkey,
              record_key, failures, fallbacks, fp16) -> C.ValidationReport:
    from hartkit.bundle import LoopInfo
    from hartkit.loop.sampler import Trace

    meta = results.entries[record_key]
    info = meta["meta"]
    loop = LoopInfo.from_dict(info["loop"])
    refs = _RemoteReferences(Path(info["checkpoint"]), Path(info["text_model"]), loop, info["output_names"])
    refruns = [results.entries[rkey[r]] for r in runs]
    fp32 = [(e["image"], Trace(tokens=list(e["tokens"]))) for e in refruns]
    captions = [e["captions"] for e in refruns]
    reference = C.ReferenceRuns(refs, prompts, seeds, info["cfg"], topk, runs, fp32, {}, samples=samples,
                                fp32_captions=captions, recorded_counts=meta["counts"])
    reference.fp32_caption = C.caption_summary([c for run in captions for c in run], reference.notes)
    rows = []
    if fp16:
        row = C.Row(FP16_LABEL, "reference", "torch", "torch-fp16", "fp16")
        g = results.entries[gkey["fp16"]]
        C.finish_row(row, [graph_from_json(x) for x in g["graphs"]],
                     [record_from_json(e["fp16"]) for e in refruns], loop.patch_nums, reference.fp32_caption)
        row.notes.extend(C.fp16_notes(fallbacks))
        reference.fp16 = row
        rows.append(row)
    for plan in planned:
        row = plan.new_row()
        g = results.entries[gkey[plan.label]]
        row.status, row.reason = g["status"], g["reason"]
        if row.status == "ok":
            graphs = [graph_from_json(x) for x in g["graphs"]]
            if plan.label in failures:
                row.graphs = graphs
                row.status, row.reason = "error", f"generation failed: {failures[plan.label][1]}"
            else:
                C.finish_row(row, graphs, [record_from_json(results.entries[runkey[(plan.label, r)]]) for r in runs],
                             loop.patch_nums, reference.fp32_caption)
        rows.append(row)
    return C.assemble_report(reference, rows, bars)


__all__ = ["sweep", "SweepResult", "SweepStats", "SweepError", "SweepWorker", "ResultsFile", "connect",
           "probe_address", "RESULTS_NAME", "DEFAULT_CHUNK"]
