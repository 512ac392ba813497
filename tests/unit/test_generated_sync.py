"""The synchronous consumer modules are generated from their asyncio originals
(tools/async_to_sync.py): the checked-in ones must be what the script makes, and the script's
rules do what its docstring says."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "async_to_sync.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("async_to_sync", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_checked_in_sync_modules_are_what_the_script_generates() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, (
        f"a generated module is stale: run `make sync-code`\n{done.stdout}{done.stderr}")


@pytest.mark.parametrize("pair", load_script().PAIRS, ids=lambda pair: pair.target)
def test_generated_modules_say_where_they_come_from(pair: object) -> None:
    target = ROOT / pair.target  # type: ignore[attr-defined]
    first = target.read_text().splitlines()[0]
    assert first.startswith(f"# Generated from {pair.source} by tools/async_to_sync.py")  # type: ignore[attr-defined]
    assert "make sync-code" in first


ASYNC_SOURCE = '''\
"""Original docstring."""

import asyncio

if True:  # ASYNC
    LABEL = "the asyncio one"
else:
    LABEL = "use AsyncConsumer instead"  # kept as written


class AsyncInboxStore:
    async def begin(self) -> None:
        # an AsyncSession comment
        async with self.lock:
            await asyncio.sleep(0)
        async for row in self.rows:
            print(row)
        return {x async for x in self.rows}

if True:  # ASYNC
    async def only_async() -> None: ...
'''


def test_conversion_rules() -> None:
    script = load_script()
    text, written_sync = script.keep_sync_branches(ASYNC_SOURCE)
    text = script.rewrite_tokens(text, {**script.NAMES, "asyncio": "time"}, written_sync)
    assert 'LABEL = "use AsyncConsumer instead"  # kept as written' in text
    assert "the asyncio one" not in text and "only_async" not in text
    assert "class InboxStore:" in text and "    def begin(self) -> None:" in text
    assert "# an Session comment" in text  # words of comments are mapped too
    assert "with self.lock:" in text and "time.sleep(0)" in text
    assert "for row in self.rows:" in text and "{x for x in self.rows}" in text
    assert "async" not in text.replace("asyncio", "") and "await" not in text
    script.verify(text, "example.py")


def test_left_over_async_names_are_refused() -> None:
    script = load_script()
    with pytest.raises(script.ConversionError, match="AsyncThing has no synchronous name"):
        script.verify("x = AsyncThing()\n", "example.py")
    with pytest.raises(script.ConversionError, match="asyncio code left"):
        script.verify("async def f() -> None: ...\n", "example.py")
