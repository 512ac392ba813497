"""The one build step pyproject.toml cannot declare: the consumer's synchronous modules
(outbox/consumer/runner.py, stores.py) are generated from the asyncio ones by
tools/async_to_sync.py, and are not in git.

`build_sync` is a sub-command of `build`, as setuptools documents for generated files (its
`SubCommand` protocol), so it runs for every way the package is built: a wheel (`pip install .`,
`pip wheel`, an sdist's wheel), where it writes into the build's lib directory, and an editable
install (`pip install -e .`, `make install`), where it writes into the source tree, which the
editable install imports from. The script needs only the standard library, so the isolated build
environment's setuptools is enough. A failure fails the build: setuptools runs a sub-command of
its own name without the fallback it gives to a customised `build_py`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

from setuptools import Command, setup
from setuptools.command.build import build

GENERATOR = os.path.join("tools", "async_to_sync.py")


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("async_to_sync", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class BuildSync(Command):
    description = "generate the consumer's synchronous modules from the asyncio ones"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        self.build_lib: str | None = None
        self.editable_mode = False

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def run(self) -> None:
        script = generator()
        # In place for an editable install: the editable wheel maps the packages to the source
        # tree. Otherwise into build_lib, after build_py (which may have copied a stale file
        # left in the tree by an editable install: this one replaces it).
        directory = script.ROOT if self.editable_mode else script.Path(self.build_lib)
        for pair in script.PAIRS:
            if script.write(pair, directory):
                self.announce(f"generated {directory / pair.target} from {pair.source}", 2)

    def _targets(self) -> list[str]:
        return [pair.target for pair in generator().PAIRS]

    def get_source_files(self) -> list[str]:
        # What sdist must carry for this step to run from it.
        return [GENERATOR, *(pair.source for pair in generator().PAIRS)]

    def get_outputs(self) -> list[str]:
        assert self.build_lib is not None
        return [os.path.join(self.build_lib, target) for target in self._targets()]

    def get_output_mapping(self) -> dict[str, str]:
        if not self.editable_mode:
            return {}
        return dict(zip(self.get_outputs(), self._targets(), strict=True))


class Build(build):
    sub_commands = [*build.sub_commands, ("build_sync", None)]


setup(cmdclass={"build": Build, "build_sync": BuildSync})
