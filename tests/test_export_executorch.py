"""ExecuTorch export (one .pte, one method per graph, XNNPACK) and the runtime on the executorch backend.

Bar: the exporter's fp32 parity check (export/parity.py: |err| <= 1e-4 + 1e-4 * max|ref| and
SNR >= 60 dB per output, on inputs recorded from the reference loop) must pass for every graph; the
runtime must sample the same tokens at every stage as the torch reference sampler for the same seed
and prompt, with an image within PSNR >= 40 dB. The export runs once for this file (about 1.5-2.5
minutes on 2 shared cores: lowering 14 methods to XNNPACK is the slow part).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings

import numpy as np
import pytest

pytest.importorskip("executorch")

from hartkit.errors import HartkitError  # noqa: E402
from hartkit.loop.metrics import psnr  # noqa: E402
from hartkit.bundle import read_manifest  # noqa: E402
from hartkit.runtime.pipeline import Pipeline  # noqa: E402

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def et_export(tiny_checkpoint, tmp_path_factory):
    from hartkit.export.exporter import export_checkpoint

    out = tmp_path_factory.mktemp("exports") / "executorch"
    lines: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export_checkpoint(tiny_checkpoint, out, ["executorch"], progress=lines.append)
    return out, result, lines


@pytest.fixture(scope="module")
def et_pipe(et_export):
    return Pipeline.from_exported(et_export[0], backend="executorch")


def test_one_program_every_graph_within_the_bar(et_export):
    out, result, _ = et_export
    info = read_manifest(out)
    graphs = [g["name"] for g in info["graphs"]]
    assert {"text_encoder", "condition", "ar_context", "ar_stage", "ar_head", "residual_0", "diffusion_condition",
            "diffusion_cond_embed", "denoise", "vae_decode"} <= set(graphs)
    # One program; the method of each graph is named after it.
    assert info["files"]["executorch"] == {g: "executorch/hart.pte" for g in graphs}
    assert (out / "executorch" / "hart.pte").is_file()
    assert not list(out.rglob("*.tmp"))
    parity = {p["graph"]: p for p in info["parity"] if p["format"] == "executorch"}
    assert set(parity) == set(graphs)
    for p in parity.values():
        assert p["ok"] and p["calls"] >= 1, p
        assert p["max_abs_err"] < 1e-4 and p["min_snr_db"] > 60, p
    assert parity["ar_stage"]["calls"] == len(info["loop"]["patch_nums"]) - 1  # every later stage checked
    assert all(r.ok for r in result.parity)


def test_program_methods_and_bounds(et_export):
    """The .pte holds exactly the graphs and plans every input at its declared maximum (no specialisation)."""
    from executorch.runtime import Runtime

    out, _, _ = et_export
    info = read_manifest(out)
    program = Runtime.get().load_program(out / "executorch" / "hart.pte")
    assert program.method_names == {g["name"] for g in info["graphs"]}
    denoise = next(g for g in info["graphs"] if g["name"] == "denoise")
    rows = denoise["inputs"][0]["shape"][0]
    # The denoiser's AdaLN chunk once pinned this dimension to its example size (see executorch_export.py).
    assert tuple(program.metadata("denoise").input_tensor_meta(0).sizes())[0] == rows["max"]


def test_delegation_report_and_weight_sharing(et_export):
    out, _, lines = et_export
    info = read_manifest(out)
    report = json.loads((out / "executorch" / "delegation.json").read_text())
    graphs = [g["name"] for g in info["graphs"]]
    assert list(report["methods"]) == graphs
    for name, m in report["methods"].items():
        assert m["file"] == "executorch/hart.pte"
        assert m["delegate_subgraphs"] >= 1 and m["ops_in_delegate"] >= 1, name
        assert m["num_ops_outside_delegate"] == sum(m["ops_outside_delegate"].values())
        assert all(isinstance(k, str) and "." in k and v > 0 for k, v in m["ops_outside_delegate"].items())
    # Every matmul of the AR graphs runs in XNNPACK: a linear outside it (the qkv projection, whose
    # bias upstream builds with a cat) runs on portable's naive addmm (minutes per call at 0.7B).
    for graph in ("ar_context", "ar_stage", "ar_head"):
        outside = report["methods"][graph]["ops_outside_delegate"]
        assert not {"aten.addmm", "aten.mm", "aten.bmm", "aten.linear"} & set(outside), (graph, outside)
    # The VAE's group norms are known to stay on the portable kernels in this executorch version.
    assert report["methods"]["vae_decode"]["ops_outside_delegate"].get("aten.native_group_norm", 0) > 0
    assert report["fallback"] is None
    pte = report["files"]["hart.pte"]
    assert pte["bytes"] == (out / "executorch" / "hart.pte").stat().st_size
    # Shared weights are stored once: ar_context and ar_stage (and the other transformer graphs) read the
    # same blocks, so the per-graph sum exceeds the distinct weights, and the program stores about the
    # distinct amount (small extras: constants made during lowering, alignment).
    summed, distinct = report["weight_bytes_summed_per_graph"], report["weight_bytes_distinct"]
    dup = summed - distinct
    assert dup > 0.1 * distinct
    stored = pte["named_data_bytes"] + pte["constant_buffer_bytes"]
    assert stored < distinct + 0.1 * dup, (stored, distinct, summed)
    assert report["methods"]["ar_context"]["weight_bytes"] == report["methods"]["ar_stage"]["weight_bytes"]
    assert any("hart.pte" in line for line in lines)  # the summary went to progress


@pytest.mark.parametrize("seed", [0, 7])
def test_runtime_on_executorch_matches_the_reference_sampler(et_pipe, tiny_model, tiny_text_encoder, seed):
    from hartkit.model.sampler import generate_from_prompts

    ref_img, ref = generate_from_prompts(tiny_model, tiny_text_encoder, [PROMPT], seed=seed)
    img, trace = et_pipe.generate(PROMPT, seed=seed)
    assert len(trace.tokens) == len(ref.tokens) == len(tiny_model.cfg.patch_nums)
    for si, (a, b) in enumerate(zip(ref.tokens, trace.tokens)):
        assert np.array_equal(np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)), f"stage {si} tokens differ"
    assert psnr(ref_img[0], img) >= 40.0


def test_mixed_backends_route_per_graph(et_export, et_pipe, tiny_checkpoint):
    """AR graphs on ExecuTorch, the VAE decoder on eager torch: routing by graph, same image."""
    from hartkit.model.torch_runner import TorchBackend
    from hartkit.backends import MixedBackend

    torch_backend, _ = TorchBackend.from_checkpoint(tiny_checkpoint)
    calls: list[str] = []

    class Spy:
        name = "torch"

        def run(self, graph, feeds):
            calls.append(graph)
            return torch_backend.run(graph, feeds)

    mixed = Pipeline(et_pipe.loop, MixedBackend(et_pipe.backend, {"vae_decode": Spy()}), et_pipe.tokenizer,
                     et_pipe.codebook)
    img, trace = mixed.generate(PROMPT, seed=1)
    ref_img, ref = et_pipe.generate(PROMPT, seed=1)
    assert calls == ["vae_decode"]
    assert all(np.array_equal(a, b) for a, b in zip(ref.tokens, trace.tokens))
    assert psnr(ref_img, img) >= 40.0


def test_parity_releases_each_program_once_its_graphs_are_checked(et_export):
    """check_backend drops what the pending graphs do not need (a 0.7B export's parity then never
    holds the 6 GB text encoder beside the AR transformer); a released graph reloads on demand."""
    from hartkit.export.parity import check_backend
    from hartkit.backends.executorch import ExecuTorchBackend

    out, _, _ = et_export
    info = json.loads((out / "manifest.json").read_text())
    backend = ExecuTorchBackend(out, info)
    feeds = {g["name"]: {i["name"]: np.full([d if isinstance(d, int) else max(1, d["min"]) for d in i["shape"]],
                                            0.1, np.float32)
                         for i in g["inputs"]}
             for g in info["graphs"] if g["name"] in ("diffusion_cond_embed", "vae_decode")}
    loaded = []

    class Watch:
        name = "executorch"

        def run(self, graph, f):
            out = backend.run(graph, f)
            loaded.append(sorted(backend._methods))
            return out

        def release_except(self, keep):
            backend.release_except(keep)

    recorded = {g: [(f, backend.run(g, f))] for g, f in feeds.items()}
    backend.release_except(frozenset())
    assert not backend._methods and not backend._programs
    rows = check_backend(Watch(), "executorch", recorded, {g: ["y"] for g in feeds})
    assert all(r.ok for r in rows)
    assert loaded == [["diffusion_cond_embed"], ["vae_decode"]]  # the first was released before the second
    assert not backend._methods and not backend._programs


def test_missing_method_file_and_bad_inputs_are_named(et_export, tmp_path):
    from hartkit.backends.executorch import ExecuTorchBackend

    out, _, _ = et_export
    info = read_manifest(out)
    ghost = dict(next(g for g in info["graphs"] if g["name"] == "vae_decode"), name="ghost_graph")
    patched = {**info, "graphs": [*info["graphs"], ghost],
               "files": {**info["files"], "executorch": {**info["files"]["executorch"], "ghost_graph": "executorch/hart.pte"}}}
    backend = ExecuTorchBackend(out, patched)
    feeds = {"f_hat": np.zeros((1, 8, 8, 8), np.float32)}
    with pytest.raises(HartkitError, match=r"no method for graph 'ghost_graph'.*methods: ar_context"):
        backend.run("ghost_graph", feeds)

    no_file = {**info, "files": {**info["files"], "executorch": {k: v for k, v in info["files"]["executorch"].items()
                                                                  if k != "denoise"}}}
    with pytest.raises(HartkitError, match="no ExecuTorch program for graph 'denoise'"):
        ExecuTorchBackend(out, no_file).run("denoise", {})

    backend = ExecuTorchBackend(out, info)
    last, cz, side = info["loop"]["patch_nums"][-1], info["loop"]["latent_dim"], info["loop"]["image_size"]
    wrong = f"[1, {cz}, {last + 1}, {last + 1}]"
    with pytest.raises(HartkitError, match=re.escape(f"graph vae_decode: input 'f_hat' has shape {wrong}")):
        backend.run("vae_decode", {"f_hat": np.zeros((1, cz, last + 1, last + 1), np.float32)})
    with pytest.raises(HartkitError, match="input 'f_hat' is float64, expected float32"):
        backend.run("vae_decode", {"f_hat": np.zeros((1, cz, last, last))})
    embed = next(g for g in info["graphs"] if g["name"] == "diffusion_cond_embed")["inputs"][0]
    with pytest.raises(HartkitError, match=r"diffusion_rows\[1\.\.\d+\]"):  # past the bound of a dynamic dim
        backend.run("diffusion_cond_embed", {"z": np.zeros((embed["shape"][0]["max"] + 1, embed["shape"][1]), np.float32)})
    (image,) = backend.run("vae_decode", {"f_hat": np.zeros((1, cz, last, last), np.float32)})
    assert image.shape == (1, 3, side, side) and image.dtype == np.float32

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "executorch" / "hart.pte").unlink()
    with pytest.raises(HartkitError, match="program of graph 'text_encoder' is missing"):
        Pipeline.from_exported(broken, backend="executorch").generate(PROMPT, seed=0)


def test_backend_module_imports_without_torch(et_export, without_torch):
    """The module imports with torch blocked; the backend then says what it needs."""
    out, _, _ = et_export
    code = f"""
from hartkit.errors import MissingDependencyError
from hartkit.backends.executorch import ExecuTorchBackend
from hartkit.bundle import read_manifest
try:
    ExecuTorchBackend({str(out)!r}, read_manifest(__import__("pathlib").Path({str(out)!r})))
except MissingDependencyError as exc:
    print("missing:", exc)
assert "torch" not in sys.modules
"""
    res = without_torch(code, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "missing: backend 'executorch' needs" in res.stdout


def test_fallback_grouping_when_one_program_fails(tiny_model, tmp_path, monkeypatch):
    """If lowering everything into one program fails, graphs go one program per weight group."""
    import hartkit.export.targets.executorch.lower as ete
    from hartkit.model.graphs import hart_graph_specs

    chosen = ("condition", "ar_head", "diffusion_cond_embed")  # three small graphs, two weight groups
    specs = [s for s in hart_graph_specs(tiny_model) if s.name in chosen]
    modules = {s.name: s.build() for s in specs}
    real = ete.lower

    def picky(file, programs, folder):
        if len(programs) == len(chosen):
            raise RuntimeError("too many methods\nsecond line")
        return real(file, programs, folder)

    monkeypatch.setattr(ete, "lower", picky)
    messages: list[str] = []
    files = ete.export_executorch(specs, modules, tmp_path, progress=messages.append)
    assert files == {"condition": "executorch/ar_transformer.pte", "ar_head": "executorch/ar_transformer.pte",
                     "diffusion_cond_embed": "executorch/diffusion_head.pte"}
    report = json.loads((tmp_path / "executorch" / "delegation.json").read_text())
    assert report["fallback"] == "one program for all graphs failed (RuntimeError: too many methods)"
    assert set(report["files"]) == {"ar_transformer.pte", "diffusion_head.pte"}
    assert any("fallback" in m for m in messages)
    assert not (tmp_path / "executorch" / "hart.pte").exists()


def test_big_models_are_lowered_per_weight_group_and_streamed(tiny_model, tmp_path, monkeypatch):
    """Past ONE_PROGRAM_MAX_WEIGHT_BYTES the single-program attempt is skipped (it would hold a second
    copy of every weight): one program per weight group, each written before the next is lowered."""
    import hartkit.export.targets.executorch.lower as ete
    from hartkit.model.graphs import hart_graph_specs

    chosen = ("condition", "ar_head", "diffusion_cond_embed")
    specs = [s for s in hart_graph_specs(tiny_model) if s.name in chosen]
    modules = {s.name: s.build() for s in specs}
    monkeypatch.setattr(ete, "ONE_PROGRAM_MAX_WEIGHT_BYTES", 1000)
    real, seen = ete.lower, []

    def spy(file, programs, folder):
        seen.append((file, sorted(programs), sorted(p.name for p in folder.glob("*.pte"))))
        return real(file, programs, folder)

    monkeypatch.setattr(ete, "lower", spy)
    files = ete.export_executorch(specs, modules, tmp_path, progress=lambda _m: None)
    assert [f for f, _, _ in seen] == ["ar_transformer.pte", "diffusion_head.pte"]  # no one-program attempt
    assert seen[1][2] == ["ar_transformer.pte"]  # the first program was on disk before the second was lowered
    report = json.loads((tmp_path / "executorch" / "delegation.json").read_text())
    assert "GB of weights: one program per weight group" in report["fallback"]
    assert list(report["methods"]) == list(chosen)
    for name, rel in files.items():
        assert report["files"][rel.split("/")[-1]]["bytes"] == (tmp_path / rel).stat().st_size
    assert not list((tmp_path / "executorch").glob("*.tmp"))


def test_qkv_bias_folding_survives_copies_and_is_undone(tiny_model):
    """The exporter folds the caller's model only while tracing, and a copy of a folded model
    computes with its own weights (a closure over the original silently dropped quantization)."""
    import copy

    import torch

    from hartkit.model.qkv_bias import fold_qkv_bias, unfold_qkv_bias

    tr = copy.deepcopy(tiny_model.transformer)
    attn = next(m for m in tr.modules() if hasattr(m, "q_bias"))
    before = {n for n, _ in tr.named_parameters()}
    folded = fold_qkv_bias(tr)
    assert folded and all(hasattr(m, "qkv_bias_folded") for m in folded) and not fold_qkv_bias(tr)
    twin = copy.deepcopy(attn)
    twin_attn_forward = twin.forward
    assert twin_attn_forward.__self__ is twin  # bound to the copy, not to the original
    unfold_qkv_bias(folded)
    assert {n for n, _ in tr.named_parameters()} == before and "forward" not in vars(attn)
    assert isinstance(twin.qkv_bias_folded, torch.nn.Parameter)
