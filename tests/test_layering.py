"""The layers only import downward (docs/architecture.md), and a config is checked without torch.

Test A builds fedtune's import graph from the source (every import, including those inside
functions; ``if TYPE_CHECKING:`` imports are annotations only and are left out) and fails on
any cycle or any arrow to a higher layer. Test B imports ``fedtune.config`` in a fresh
interpreter, builds and validates configs (good and bad), and checks torch and flwr stay out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fedtune"

# Layer of each module: the longest matching prefix wins. Keep in sync with docs/architecture.md.
LAYERS: dict[str, int] = {
    # 1 kernel: errors, registry, wire keys, the torch-free catalog of names and capabilities
    # and leaf utilities that import nothing of fedtune but errors
    "fedtune.errors": 1, "fedtune.registry": 1, "fedtune.wire_keys": 1, "fedtune.catalog": 1,
    "fedtune.deploy.errors": 1, "fedtune.edge_export.errors": 1, "fedtune.wheels": 1, "fedtune.version": 1, "fedtune.deploy.processes": 1,
    "fedtune.flat_keys": 1,  # the one parser of flat key values (config and profiles)
    # 2 config: schema and per-field checks (config, profile specs, presets) and compat, the cross-section rules
    "fedtune.compat": 2, "fedtune.config": 2, "fedtune.profile_specs": 2, "fedtune.presets": 2,
    # 3 math: pure functions on tensors (torch only), devices, the wire format
    "fedtune.strategies.lora": 3, "fedtune.strategies.aggregation": 3, "fedtune.strategies.robust": 3,
    "fedtune.strategies.sparse": 3, "fedtune.compression.codecs": 3, "fedtune.compression.sparse_wire": 3,
    "fedtune.device": 3, "fedtune.quant": 3, "fedtune.wire": 3, "fedtune.privacy.accountant": 3,
    "fedtune.artifacts": 3,  # the run directory: the files training writes and export reads
    # 4 model, data, tasks, adapter kinds, local training
    "fedtune.bases": 4, "fedtune.adapters": 4, "fedtune.adapter_kinds": 4, "fedtune.modeling": 4, "fedtune.tasks": 4,
    "fedtune.training": 4, "fedtune.evaluation": 4, "fedtune.data": 4, "fedtune.llm": 4, "fedtune.sparse": 4,
    "fedtune.head_init": 4, "fedtune.profiles": 4, "fedtune.privacy": 4,
    # 5 federation: strategies, clients, screens, DP wrappers, compression of replies
    "fedtune.strategies": 5, "fedtune.strategies.sparse.strategy": 5, "fedtune.client": 5, "fedtune.compression": 5, "fedtune.server.screen": 5,
    "fedtune.privacy.client": 5, "fedtune.privacy.federation": 5, "fedtune.privacy.canaries": 5,
    "fedtune.privacy.audit": 5, "fedtune.sparse.train": 5,
    # 6 apps: server, simulations, deploy, edge export, reports, cli
    "fedtune.server": 6, "fedtune.simulations": 6, "fedtune.deploy": 6, "fedtune.edge_export": 6,
    "fedtune.report": 6, "fedtune.cli": 6, "fedtune.__main__": 6,
    "fedtune.api": 6,  # the public functions; the package's __init__ (layer 7) re-exports them lazily
    # plugins: the loader imports user modules by name (kernel, torch-free, config calls it); the
    # registration functions add to the catalog and to the registries of layers 4-5
    "fedtune.plugin_loader": 1, "fedtune.plugins": 5,
}


def layer(module: str) -> int:
    if module == "fedtune":  # the package's __init__: the public API (fedtune.api), loaded on first use
        return 7
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise AssertionError(f"{module} has no layer: add it to LAYERS (and docs/architecture.md)")


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _type_only(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def import_graph() -> dict[str, set[str]]:
    """{module: fedtune modules it imports}, every import statement anywhere in the file."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_only(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from fedtune import wire` is an arrow to fedtune.wire only; the package itself
                # is imported only for a name that is not a submodule
                subs = [f"{base}.{a.name}" for a in node.names]
                names = subs + ([base] if any(s not in mods for s in subs) else [])
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name.startswith("fedtune") and name != mod:
                    graph[mod].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer_and_imports_only_downward() -> None:
    graph = import_graph()
    upward = sorted(f"{a} (layer {layer(a)}) -> {b} (layer {layer(b)})"
                    for a, deps in graph.items() for b in deps
                    if layer(b) > layer(a))
    assert upward == [], "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    assert _cycles(import_graph()) == []


def _external_imports(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports (anywhere in the file, TYPE_CHECKING aside)."""
    tree = ast.parse(path.read_text())
    skip = _type_only(tree)
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module)
    return out


def test_edge_export_reads_run_files_only() -> None:
    """Run files are the contract between training and export (docs/architecture.md): no module
    of fedtune.edge_export imports strategy code, the server or Flower."""
    graph = import_graph()
    banned = ("fedtune.strategies", "fedtune.server", "flwr")
    found = sorted(f"{mod} -> {dep}" for mod, path in modules().items() if mod.startswith("fedtune.edge_export")
                   for dep in graph[mod] | _external_imports(path)
                   if any(dep == b or dep.startswith(b + ".") for b in banned))
    assert found == [], "edge_export imports training code:\n" + "\n".join(found)


def test_the_graph_sees_imports_inside_functions() -> None:
    """The checker is not blind: a function-level import is an arrow."""
    graph = import_graph()
    assert "fedtune.catalog" in graph["fedtune.config"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_config_kernel_imports_only_the_kernel() -> None:
    """config and compat see only layer 1 (and each other / the profile specs)."""
    graph = import_graph()
    for mod in ("fedtune.config", "fedtune.compat", "fedtune.profile_specs", "fedtune.catalog"):
        assert {layer(d) for d in graph[mod]} <= {1, 2}, (mod, graph[mod])


NO_TORCH = r"""
import sys
from fedtune.config import build_config, parse_set, RunConfig
from fedtune.errors import ConfigError
cfg = build_config(parse_set(["rounds=2", "strategy=flexlora", "profiles=gpu-large,gpu-small,cpu-edge"]))
build_config({"adapter": "sparse", "compression": "int8", "dp": "sample", "noise-multiplier": 1.0,
              "sparse-selection": "random", "device": "cuda:0", "head-init": "ncm"})
build_config({"profile-defs": ["tiny lora-rank=2 layers=1 device=cpu"], "profiles": "tiny:0.5,cpu-edge:0.5"})
RunConfig.from_json(cfg.to_json())
bad = [{"strategy": "fedsa", "compression": "topk"}, {"adapter": "sparse", "strategy": "flora"},
       {"dp": "client-fixed", "noise-multiplier": 1.0, "strategy": "hetlora", "head-init": "random"},
       {"robust": "median", "strategy": "flora"}, {"secure-aggregation": "secagg+", "strategy": "flexlora"},
       {"task": "causal-lm"}, {"device": "tpu"}, {"adapter": "vera"}, {"profiles": "nope"}]
for overrides in bad:
    try:
        build_config(overrides)
    except ConfigError as exc:
        print("refused:", exc)
    else:
        raise SystemExit(f"accepted {overrides}")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "flwr", "transformers", "peft", "opacus"))
print("LOADED", loaded)
"""


def test_config_validation_loads_neither_torch_nor_flwr() -> None:
    out = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, cwd=ROOT).stdout
    assert out.count("refused: bad value") + out.count("refused: unknown") == 9, out
    assert "LOADED []" in out, out


@pytest.mark.parametrize(("registry", "names"), [
    ("fedtune.adapter_kinds:KINDS", "ADAPTER_KINDS"), ("fedtune.sparse.select:SELECTIONS", "SELECTIONS"),
    ("fedtune.compression.codecs:CODECS", "CODECS"), ("fedtune.tasks:TASKS", "TASKS"),
    ("fedtune.strategies.robust:ROBUST", "ROBUST"), ("fedtune.privacy.accountant:ACCOUNTANTS", "ACCOUNTANTS"),
    ("fedtune.strategies:STRATEGIES", "STRATEGIES"),
])
def test_the_catalog_names_what_is_registered(registry: str, names: str) -> None:
    import importlib

    from fedtune import catalog

    module, attr = registry.split(":")
    assert sorted(getattr(importlib.import_module(module), attr).names()) == sorted(getattr(catalog, names))


def test_one_spec_per_strategy_and_compat_reads_its_flags() -> None:
    """The tables the flags replaced, as they were (docs/strategies.md, docs/privacy.md)."""
    from fedtune import compat
    from fedtune.catalog import STRATEGIES as CATALOG
    from fedtune.strategies import SPECS
    from fedtune.strategies.hetero import FFALoRA, FedSALoRA, FLoRA

    assert compat.CLIENT_LEVEL_STRATEGIES == ("fedavg",)
    assert compat.SECAGG_STRATEGIES == ("fedavg", "fedavgm", "fedadam", "ffa")
    assert compat.ROBUST_STRATEGIES == ("fedavg", "fedavgm", "fedadam")
    assert [n for n, s in CATALOG.items() if not s.shapeless_codecs] == ["flora", "fedsa"]
    assert sorted(n for n, s in SPECS.items() if s.rank_aware) == sorted(n for n, s in CATALOG.items() if s.rank_aware)
    assert (FLoRA.sends, FFALoRA.sends, FedSALoRA.sends) == ((), ("B",), ("A",))
    assert SPECS["ffa"].recipe.frozen == ("lora_A",) and SPECS["fedsa"].recipe.local == ("lora_B",)
    assert SPECS["flexlora"].math.__name__ == "flexlora" and SPECS["fedavgm"].math is None
