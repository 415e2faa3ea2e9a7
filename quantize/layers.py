"""The quantizable layers of a HART export: stable names, kinds, shapes, and which graphs use them.

A layer is named ``component/path`` with the path relative to its component's root module, so the
name does not depend on which graph wrapper holds it (the AR blocks appear in ``ar_context`` and
``ar_stage``, ``word_embed`` in every ``residual_*`` graph):

=================  ==========================================  ===========================================
component          root module                                 example
=================  ==========================================  ===========================================
text_encoder       the Qwen2 text encoder                      ``text_encoder/layers.0.self_attn.q_proj``
ar_transformer     ``model.transformer`` minus ``diffloss``    ``ar_transformer/blocks.1.ffn.down_proj``
diffusion_head     ``model.transformer.diffloss``              ``diffusion_head/net.res_blocks.0.mlp.0``
vae                ``model.vae``                               ``vae/decoder.mid.block_1.conv1``
=================  ==========================================  ===========================================

Which graphs use a layer is measured, not guessed: every graph runs once under a torch function
mode that sees which weights feed F.linear / F.conv2d / F.embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode



@dataclass(frozen=True)
class Layer:
    name: str  # "component/path"
    component: str
    kind: str  # "linear" | "conv" | "embedding"
    shape: tuple[int, ...]  # weight shape
    has_bias: bool
    graphs: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return self.name.split("/", 1)[1]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def in_features(self) -> int:
        """The reduction size that quantization groups run along (linear: in; conv: in channels)."""
        if self.kind == "linear":
            return self.shape[1]
        if self.kind == "conv":
            return self.shape[1]
        return self.shape[1]  # embedding: the hidden size (one row is looked up at a time)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def reduction(self) -> int:
        """Elements reduced per output (conv: in_channels * kh * kw)."""
        return int(np.prod(self.shape[1:]))

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "graphs": list(self.graphs)}


def kind_of(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def component_roots(model, encoder: nn.Module | None) -> list[tuple[str, nn.Module, str]]:
    """(component, root module, name prefix to strip) in the order names are assigned."""
    roots = []
    if encoder is not None:
        roots.append(("text_encoder", encoder, ""))
    roots.append(("diffusion_head", model.transformer.diffloss, ""))
    roots.append(("ar_transformer", model.transformer, ""))
    roots.append(("vae", model.vae, ""))
    return roots


def layer_modules(model, encoder: nn.Module | None) -> dict[str, nn.Module]:
    """name -> module for every Linear/Conv2d/Embedding of the model (each module named once)."""
    seen: set[int] = set()
    out: dict[str, nn.Module] = {}
    for component, root, _ in component_roots(model, encoder):
        for path, mod in root.named_modules():
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            if kind_of(mod) is not None and path:
                out[f"{component}/{path}"] = mod
    return out


@dataclass
class LayerTable:
    """All layers of one model, with the graphs each is used by."""

    layers: dict[str, Layer] = field(default_factory=dict)
    other: dict[str, int] = field(default_factory=dict)  # component -> parameters outside layer weights

    def __iter__(self):
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> Layer:
        return self.layers[name]

    def of_component(self, component: str) -> list[Layer]:
        return [l for l in self.layers.values() if l.component == component]

    def of_graph(self, graph: str) -> list[Layer]:
        return [l for l in self.layers.values() if graph in l.graphs]

    def names(self) -> list[str]:
        return list(self.layers)



def discover(model, encoder: nn.Module | None, specs: Iterable, inputs: Mapping[str, Sequence] | None = None) -> LayerTable:
    """The layers the exported graphs actually use, with their graphs.

    ``inputs`` maps graph -> positional inputs (numpy or torch) for the hook run; missing graphs run
    on their spec's random example inputs (shapes are what matters here, not values).
    """
    named = layer_modules(model, encoder)
    weight_ids = {id(m.weight): n for n, m in named.items()}
    params = {id(p): p for _, root, _ in component_roots(model, encoder) for p in root.parameters()}
    specs = list(specs)
    modules = {s.name: s.build().eval() for s in specs}
    feeds = {}
    for s in specs:
        given = (inputs or {}).get(s.name)
        if given is None:
            feeds[s.name] = s.example_inputs()
        else:
            feeds[s.name] = tuple(torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
                                  for x in given)
    watch = _usage(modules, feeds, weight_ids, set(params))
    table = LayerTable()
    for name, mod in named.items():
        if name not in watch.used:
            continue  # not in any exported graph (e.g. the VAE encoder)
        component = name.split("/", 1)[0]
        table.layers[name] = Layer(name, component, kind_of(mod), tuple(mod.weight.shape),
                                   getattr(mod, "bias", None) is not None,
                                   tuple(s.name for s in specs if s.name in watch.used[name]))
    # Parameters the graphs read outside the layer weights (norms, biases, lvl_embed rows), per component.
    counted = {id(named[n].weight) for n in table.layers}
    seen: set[int] = set()
    for component, root, _ in component_roots(model, encoder):
        total = 0
        for p in root.parameters():
            if id(p) in watch.params_seen and id(p) not in counted and id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        table.other[component] = total
    return table


LAYER_FUNCS = {F.linear: "linear", F.conv2d: "conv", F.embedding: "embedding"}


class WeightWatch(TorchFunctionMode):
    """Sees every torch call: which layer weights feed F.linear/F.conv2d/F.embedding, and which
    parameters are read at all. A function mode (not module hooks) because some weights are used
    without calling their module: the AR attention runs ``F.linear(x, self.qkv_proj.weight, bias)``."""

    def __init__(self, weight_ids: Mapping[int, str], param_ids: set[int]) -> None:
        super().__init__()
        self.weight_ids = weight_ids
        self.param_ids = param_ids
        self.graph = ""
        self.used: dict[str, set[str]] = {}
        self.params_seen: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in LAYER_FUNCS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            name = self.weight_ids.get(id(weight))
            if name is not None:
                self.used.setdefault(name, set()).add(self.graph)
        for a in (*args, *kwargs.values()):
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(t, torch.Tensor) and id(t) in self.param_ids:
                    self.params_seen.add(id(t))
        return func(*args, **kwargs)


def _usage(modules: Mapping[str, nn.Module], feeds: Mapping[str, Sequence[torch.Tensor]],
           weight_ids: Mapping[int, str], param_ids: set[int]) -> WeightWatch:
    watch = WeightWatch(weight_ids, param_ids)
    with torch.no_grad():
        for graph, module in modules.items():
            watch.graph = graph
            with watch:
                module(*feeds[graph])
    return watch


__all__ = ["Layer", "LayerTable", "discover", "layer_modules", "kind_of"]
