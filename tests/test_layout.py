"""The package's shape: what installs under which name, which layer may import which, no import
circles, and one list of training stages. Read from the source with `ast`; nothing runs."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# repository folder -> installed package name (pyproject's package-dir)
FOLDERS = {"dualtok_core": "dualtok_core", "pipelines": "dualtok.pipelines", "jobs": "dualtok.jobs"}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, at module level or inside functions."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:  # `from pkg import module` names the module
                submodules = [f"{node.module}.{alias.name}" for alias in node.names]
                candidates = [m for m in submodules if m in mods] or [node.module]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            deps.update(c for c in candidates if c in mods and c != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_layers_import_downward_only():
    """jobs -> pipelines -> dualtok_core; core imports no Ray."""
    bad = [(a, b) for a, deps in import_graph().items() for b in deps
           if (a.startswith("dualtok_core") and not b.startswith("dualtok_core"))
           or (a.startswith("dualtok.pipelines") and b.startswith("dualtok.jobs"))]
    assert bad == []
    for name, path in modules().items():
        if name.startswith("dualtok_core"):
            tree = ast.parse(path.read_text())
            imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert "ray" not in imported, name


def test_pyproject_installs_every_package_folder_under_the_dualtok_namespace():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert set(setuptools["packages"]) == packages
    assert setuptools["package-dir"] == {"dualtok.pipelines": "pipelines", "dualtok.jobs": "jobs"}


def test_installed_package_claims_no_generic_top_level_name(tmp_path):
    """From a folder outside the repository, `jobs` and `pipelines` are not importable."""
    code = ("import importlib.util, dualtok.jobs.cli, dualtok.pipelines.io.storage; "
            "print(importlib.util.find_spec('jobs'), importlib.util.find_spec('pipelines'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None"]


def test_one_list_of_training_stages():
    """The stage classes (core) and the stage configs (their recipes) name the same stages, and
    every semantic stage's trainable parts come from the semantic tokenizer's own table."""
    from dualtok_core.semantic import STAGE_TRAINABLE
    from dualtok_core.training_stages import STAGES
    from dualtok.jobs.kinds import KINDS
    from dualtok.pipelines.train.config import STAGE_CONFIGS

    assert list(STAGE_CONFIGS) == list(STAGES)
    assert {k for k in KINDS if k.startswith("train-")} == {f"train-{s}" for s in STAGES}
    assert {s for s, cls in STAGES.items() if cls.part == "semantic"} == set(STAGE_TRAINABLE)
    assert all(cls.loss_terms and cls.parts()[0] == cls.part for cls in STAGES.values())


@pytest.mark.parametrize("folder", ["pipelines", "jobs", "dualtok_core"])
def test_each_folder_says_what_lives_there(folder):
    """A README per top folder, and a docstring on every sub-package and module."""
    assert (ROOT / folder / "README.md").is_file()
    missing = [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py")
               if not ast.get_docstring(ast.parse(p.read_text())) and p.stat().st_size > 0
               or p.name == "__init__.py" and not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []


def test_the_cli_entry_point_resolves():
    spec = importlib.util.find_spec("dualtok.jobs.cli")
    assert spec is not None and Path(spec.origin).parent == ROOT / "jobs"


def test_the_recipe_and_the_loss_agree_on_label_smoothing():
    from dualtok_core.semantic import SEED_LABEL_SMOOTHING
    from dualtok.pipelines.train.config import QFormerTrainConfig

    assert QFormerTrainConfig.label_smoothing == SEED_LABEL_SMOOTHING


def test_job_kinds_and_configs_import_without_torch(tmp_path):
    """`dualtok submit` and `dualtok manifests` read every job's config type: no model import."""
    code = ("import sys, dualtok.jobs.kinds, dualtok.pipelines.train.config, dualtok.pipelines.tokenize.config; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
