"""Packaging: the wheel carries the project's own files (notebooks, profiles, references, the book's pages and
configuration) as package data, so that an installed ``fmnist-book`` runs from any directory.

These files have one copy, at the repository root; building the wheel copies them into ``fmnist_core/_data/``.
Their list is ``PROJECT_FILES`` in ``fmnist_core/core/resources.py`` (which also finds them at run time); the rest
of the package metadata is in ``pyproject.toml``.
"""
import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _resources():
    """``fmnist_core/core/resources.py`` loaded on its own (it imports nothing outside the standard library)."""
    spec = importlib.util.spec_from_file_location("_fmnist_resources", ROOT / "fmnist_core" / "core" / "resources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProjectFiles(build_py):
    """``build_py`` that also copies the project files into ``fmnist_core/_data/`` of the build."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads them from the checkout
            return
        resources = _resources()
        target = Path(self.build_lib) / resources.PACKAGE / resources.DATA_FOLDER
        ignore = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "*.pyc")
        for name in resources.PROJECT_FILES:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, target / name, ignore=ignore, dirs_exist_ok=True)
            elif source.is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)
            elif name not in resources.OPTIONAL_PROJECT_FILES:
                raise FileNotFoundError(f"{source}: a project file the package needs is missing")


setup(cmdclass={"build_py": BuildPyWithProjectFiles})
