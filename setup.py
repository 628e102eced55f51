"""Build step only: copy the editable defaults in config/ into the wheel as hetserve/shipped/.

Everything else about the package is declared in pyproject.toml. config/ stays the one source
people edit; partitioner.defaults finds the copy through importlib.resources once installed.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DEFAULTS = ("config.properties", "model-config.yaml", "log4j2.xml")


class BuildPyWithDefaults(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the clone's config/ directly
        source = Path(__file__).resolve().parent / "config"
        target = Path(self.build_lib) / "hetserve" / "shipped"
        target.mkdir(parents=True, exist_ok=True)
        for name in DEFAULTS:
            shutil.copyfile(source / name, target / name)


setup(cmdclass={"build_py": BuildPyWithDefaults})
