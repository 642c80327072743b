"""The layout is the architecture: core imports only core, a chapter only core and its own package, no cycles;
an experiment's key covers exactly the source its notebook imports; every parameter is read; every data
dependency between experiments is declared."""
import ast
import json
from pathlib import Path

import pytest

from fmnist_core.core.io import PROJECT_ROOT
from fmnist_core.core.jobs import imported_modules, module_closure
from fmnist_core.pipeline import runner
from fmnist_core.pipeline.experiments import EXPERIMENTS

PACKAGE = PROJECT_ROOT / "fmnist_core"


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return imported_modules(path.read_text(), package) - {module}


def owner(module: str) -> tuple[str, ...]:
    """("core",), ("chapters", <chapter>), ("pipeline",) or ("package",) for the package itself."""
    parts = module.split(".")[1:]
    if not parts:
        return ("package",)
    return ("chapters", parts[1]) if parts[0] == "chapters" and len(parts) > 1 else (parts[0],)


def allowed(importer: str, imported: str) -> bool:
    src, dst = owner(importer), owner(imported)
    if dst in (("package",), ("chapters",)) or src == ("package",):
        return True
    if src == ("core",):
        return dst == ("core",)
    if src[0] == "chapters":
        return dst == ("core",) or dst == src
    return True  # the pipeline may use everything


def test_every_module_sits_in_one_of_the_three_layers():
    layers = {owner(m)[0] for m in MODULES}
    assert layers == {"package", "core", "chapters", "pipeline"}
    chapters = {owner(m)[1] for m in MODULES if owner(m)[0] == "chapters" and len(owner(m)) > 1}
    assert chapters == {"dataset", "classification", "layerwise", "vae", "semisupervised", "fixmatch"}


def test_core_imports_only_core_and_chapters_only_core_and_themselves():
    violations = [f"{m} imports {i}" for m in sorted(MODULES) for i in sorted(imports_of(m)) if not allowed(m, i)]
    assert violations == []


def test_the_import_rule_itself_catches_violations():
    assert not allowed("fmnist_core.core.data", "fmnist_core.chapters.vae")
    assert not allowed("fmnist_core.chapters.semisupervised.model", "fmnist_core.chapters.vae")
    assert not allowed("fmnist_core.chapters.vae", "fmnist_core.pipeline.report")
    assert allowed("fmnist_core.chapters.fixmatch.study", "fmnist_core.chapters.fixmatch.algorithm")


def test_there_are_no_import_cycles():
    graph = {m: imports_of(m) & set(MODULES) for m in MODULES}
    state = {}

    def visit(module, path):
        if state.get(module) == "open":
            raise AssertionError("import cycle: " + " -> ".join(path + [module]))
        if state.get(module) != "done":
            state[module] = "open"
            for dep in graph[module]:
                if dep != "fmnist_core" and not module.startswith(dep + "."):  # a package's __init__ is not a cycle
                    visit(dep, path + [module])
            state[module] = "done"
    for module in graph:
        visit(module, [])


def test_no_function_is_longer_than_fifty_lines():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 50:
                long.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_an_experiment_key_covers_the_source_its_notebook_imports(experiment):
    closure = module_closure(runner.notebook_modules(experiment))
    chapter = {"dataset": "dataset", "classification": "classification", "layerwise": "layerwise", "vae": "vae",
               "semisupervised": "semisupervised", "fixmatch": "fixmatch"}[experiment]
    assert any(m.startswith(f"fmnist_core.chapters.{chapter}") for m in closure)
    assert "fmnist_core.core.io" in closure and "fmnist_core.pipeline.report" in closure
    others = {m.split(".")[2] for m in closure if m.startswith("fmnist_core.chapters.")} - {chapter}
    assert others <= {"dataset"}, f"{experiment}'s key includes other chapters: {others}"
    sources = runner.key_parts(experiment, "smoke", runner.resolve_params(experiment, "smoke"), Path("/nonexistent"))
    assert set(sources["sources"]) == {str(MODULES[m].relative_to(PROJECT_ROOT)) for m in closure}


def test_lfw_is_part_of_the_vae_key():
    assert "fmnist_core/core/lfw.py" in runner.key_parts("vae", "smoke", runner.resolve_params("vae", "smoke"),
                                                          Path("/nonexistent"))["sources"]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_every_parameter_of_an_experiment_is_read_by_its_run(smoke_book, experiment):
    trace = json.loads((smoke_book[0] / experiment / "trace.json").read_text())
    assert trace["unread_parameters"] == [], f"{experiment} accepts parameters its run never reads"


@pytest.mark.slow
@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_every_results_folder_a_notebook_reads_is_declared(smoke_book, experiment):
    trace = json.loads((smoke_book[0] / experiment / "trace.json").read_text())
    declared = set(EXPERIMENTS[experiment].requires + EXPERIMENTS[experiment].reads)
    assert set(trace["results_read"]) <= declared, f"{experiment} reads undeclared results"


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_every_notebook_cell_has_an_id(experiment):
    notebook = json.loads((PROJECT_ROOT / "notebooks" / f"{experiment}.ipynb").read_text())
    assert (notebook["nbformat"], notebook["nbformat_minor"]) >= (4, 5)
    assert all(cell.get("id") for cell in notebook["cells"])  # nbformat 4.5 requires them
