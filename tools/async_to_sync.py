"""Generates the consumer's synchronous modules from their asyncio originals, as psycopg 3 does
(its tools/async_to_sync.py): the asyncio module is the one that is written and reviewed, the
synchronous twin is derived from it and checked in, and `--check` (run by the unit tests, hence
by `make test`) fails while a checked-in twin differs from what this script makes.

    python tools/async_to_sync.py           # rewrite the synchronous modules (`make sync-code`)
    python tools/async_to_sync.py --check   # exit 1 and show the difference if one is stale

The conversion, on the source text so that comments and layout survive:
- `async def`, `async with`, `async for` lose `async`; `await x` becomes `x`;
- the names of NAMES are replaced, in code and in the words of strings and comments alike
  (`AsyncConnection` -> `Connection`, `AsyncInboxStore` -> `InboxStore`, ...), and the modules of
  MODULES in imports;
- where sync and async truly differ, the asyncio module says both, in a block found with `ast`:

      if True:  # ASYNC
          <asyncio code>        (kept in the asyncio module, dropped from the sync one)
      else:
          <synchronous code>    (never runs in the asyncio module; dedented into the sync one)

  An `if True:  # ASYNC` block without `else` is asyncio-only.
Then `ruff` sorts the imports and drops the ones only the asyncio code used. The result must parse
and may not hold any `async`/`await` or unmapped `Async...` name: the script fails otherwise.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import io
import re
import subprocess
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "make sync-code"


@dataclass(frozen=True)
class Pair:
    source: str  # the asyncio module, relative to ROOT
    target: str  # the synchronous module made from it
    docstring: str  # the synchronous module's own docstring, in place of the original's
    names: dict[str, str] = field(default_factory=dict)  # replacements for this file only
    # Text the sync module says otherwise, (asyncio text, sync text): each must occur once.
    texts: tuple[tuple[str, str], ...] = ()


# Names with a synchronous counterpart, for every file. Keys are whole identifiers (or whole
# words, in strings and comments).
NAMES = {
    # drivers' types
    "AsyncConnection": "Connection",
    "AsyncConnectionPool": "ConnectionPool",
    "AsyncEngine": "Engine",
    "AsyncSession": "Session",
    "async_sessionmaker": "sessionmaker",
    "AsyncDatabase": "Database",
    "AsyncCollection": "Collection",
    "AsyncClientSession": "ClientSession",
    "AsyncIterator": "Iterator",
    "Awaitable": "Callable",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    # the consumer's own
    "AsyncInboxStore": "InboxStore",
    "AsyncInboxTransaction": "InboxTransaction",
    "AsyncSqlAlchemyStore": "SqlAlchemyStore",
    "_AsyncSqlAlchemyTransaction": "_SqlAlchemyTransaction",
    "AsyncPsycopgStore": "PsycopgStore",
    "_AsyncPsycopgTransaction": "_PsycopgTransaction",
    "AsyncMongoStore": "MongoStore",
    "_AsyncMongoTransaction": "_MongoTransaction",
    "async_store": "sync_store",
    "AsyncConsumer": "Consumer",
    "AsyncDriver": "SyncDriver",
    "AsyncHandler": "Handler",
    "AsyncRunContext": "RunContext",
    "AsyncStopEvent": "StopEvent",
    "wait_async": "wait",
    "aio_stores": "stores",
}

MODULES = {
    "pymongo.asynchronous.client_session": "pymongo.client_session",
    "pymongo.asynchronous.collection": "pymongo.collection",
    "pymongo.asynchronous.database": "pymongo.database",
}

PAIRS = [
    Pair(
        "outbox/consumer/aio_stores.py", "outbox/consumer/stores.py",
        docstring="""Inbox stores of the synchronous consumer: where the dedup row and the
handler's writes go, in one transaction.

One interface (`InboxStore` / `InboxTransaction`), one class per driver: SQLAlchemy (Engine or
sessionmaker), psycopg (ConnectionPool, conninfo string or Connection) and pymongo (Database);
`sync_store` picks one for `db=` or `mongo=`. The decisions on their failures are in
`outbox.consumer.store_rules`. Generated from the asyncio stores, `outbox.consumer.aio_stores`.
""",
    ),
    Pair(
        "outbox/consumer/aio.py", "outbox/consumer/runner.py",
        docstring="""`Consumer`: the synchronous idempotent consumer (SQLAlchemy, psycopg or
pymongo). Its decisions are in `engine` (a batch) and `schedule` (the run loop); this module
only carries them out. Generated from the asyncio consumer, `outbox.consumer.aio`.
""",
        texts=(("Handlers are `async def handler(", "Handlers are `def handler("),),
    ),
]

_MARKER = re.compile(r"^\s*if True:\s*#\s*ASYNC\b")
# Strings and comments; from Python 3.12 on, an f-string's text is FSTRING_MIDDLE tokens.
_TEXT_TOKENS = {tokenize.STRING, tokenize.COMMENT, getattr(tokenize, "FSTRING_MIDDLE", -1)}
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ConversionError(Exception):
    pass


def header(pair: Pair) -> str:
    return (
        f"# Generated from {pair.source} by tools/async_to_sync.py (`{COMMAND}`).\n"
        f"# Do not edit: edit the original and regenerate; `make test` fails while they differ.\n"
    )


def _marker_blocks(text: str, lines: list[str]) -> list[ast.If]:
    blocks: list[ast.If] = []
    for node in ast.walk(ast.parse(text)):
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Constant)
                and node.test.value is True and _MARKER.match(lines[node.lineno - 1])):
            blocks.append(node)
    return blocks


def _first_line(node: ast.stmt) -> int:
    decorators: list[ast.expr] = getattr(node, "decorator_list", [])
    return min([node.lineno, *(d.lineno for d in decorators)])


def keep_sync_branches(text: str) -> tuple[str, set[int]]:
    """Replace each `if True:  # ASYNC` block by its `else` body, dedented; returns the text
    and the numbers of its lines that came from such bodies."""
    lines = text.splitlines(keepends=True)
    blocks = _marker_blocks(text, lines)
    # Bottom-up, so that the line numbers of the blocks above stay right; nested blocks are
    # not supported (the outer one would take the inner one's lines with it).
    # Each line is tagged with whether it came from a synchronous branch.
    tagged = [(line, False) for line in lines]
    for node in sorted(blocks, key=lambda n: n.lineno, reverse=True):
        end = node.end_lineno
        assert end is not None
        indent = len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())
        if not node.orelse:
            replacement: list[tuple[str, bool]] = []
        else:
            body_end = node.body[-1].end_lineno
            assert body_end is not None
            else_line = next(
                i for i in range(body_end, _first_line(node.orelse[0]))
                if lines[i].strip() == "else:"
            )
            body = lines[else_line + 1 : end]
            inner = min(len(b) - len(b.lstrip()) for b in body if b.strip())
            cut = inner - indent
            replacement = [(b[cut:] if b.strip() else b, True) for b in body]
        tagged[node.lineno - 1 : end] = replacement
    text = "".join(line for line, _ in tagged)
    return text, {row for row, (_, sync) in enumerate(tagged, start=1) if sync}


def _map_words(text: str, names: dict[str, str]) -> str:
    return _WORD.sub(lambda m: names.get(m.group(), m.group()), text)


def rewrite_tokens(text: str, names: dict[str, str], written_sync: set[int]) -> str:
    """Drop `async`/`await`, map names (code, strings, comments) and import modules. The
    strings and comments of `written_sync` lines are left as they are: they were written for
    the synchronous code (`use AsyncConsumer ...` must stay so)."""
    lines = text.splitlines(keepends=True)
    # (row, col, end row, end col, new text); a multi-line string is replaced whole.
    edits: list[tuple[int, int, int, int, str]] = []
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    for index, token in enumerate(tokens):
        (row, col), (end_row, end_col) = token.start, token.end
        if token.type == tokenize.NAME and token.string in ("async", "await"):
            following = tokens[index + 1]
            if following.start[0] != row:
                raise ConversionError(f"line {row}: `{token.string}` at the end of a line")
            edits.append((row, col, row, following.start[1], ""))
        elif token.type == tokenize.NAME and token.string in names:
            edits.append((row, col, end_row, end_col, names[token.string]))
        elif token.type in _TEXT_TOKENS and row not in written_sync:
            new = _map_words(token.string, names)
            if new != token.string:
                edits.append((row, col, end_row, end_col, new))
    for row, col, end_row, end_col, new in sorted(edits, reverse=True):
        first, last = lines[row - 1], lines[end_row - 1]
        lines[row - 1 : end_row] = [first[:col] + new + last[end_col:]]
    result = "".join(lines)
    for old, new in MODULES.items():
        result = re.sub(rf"^(\s*from ){re.escape(old)}( import )", rf"\g<1>{new}\g<2>", result,
                        flags=re.M)
    return result


def ruff_fix(text: str, target: str) -> str:
    """Imports sorted, those only the asyncio code needed dropped, and the `noqa` only the
    asyncio module needed (ruff's I, F401 and RUF100)."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--quiet", "--fix-only", "--exit-zero",
         "--select", "I,F401,RUF100", "--stdin-filename", str(ROOT / target), "-"],
        input=text, capture_output=True, text=True, cwd=ROOT, check=False,
    )
    if done.returncode != 0:
        raise ConversionError(f"ruff failed on {target}: {done.stderr.strip()}")
    fixed: str = done.stdout
    return fixed


def verify(text: str, target: str) -> None:
    try:
        tree = ast.parse(text)
    except SyntaxError as exc:
        raise ConversionError(f"{target}: the generated code does not parse: {exc}") from exc
    for node in ast.walk(tree):
        if isinstance(node, ast.Await | ast.AsyncFunctionDef | ast.AsyncWith | ast.AsyncFor) or (
                isinstance(node, ast.comprehension) and node.is_async):
            raise ConversionError(
                f"{target}:{getattr(node, 'lineno', '?')}: asyncio code left after conversion")
        if isinstance(node, ast.Name | ast.Attribute):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if name.startswith(("Async", "_Async", "async_")):
                raise ConversionError(
                    f"{target}:{node.lineno}: {name} has no synchronous name: add it to NAMES")


def replace_docstring(text: str, docstring: str, source: str) -> str:
    tree = ast.parse(text)
    first = tree.body[0] if tree.body else None
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        raise ConversionError(f"{source} has no module docstring")
    lines = text.splitlines(keepends=True)
    assert first.end_lineno is not None
    lines[first.lineno - 1 : first.end_lineno] = [f'"""{docstring.rstrip()}\n"""\n']
    return "".join(lines)


def replace_texts(text: str, texts: tuple[tuple[str, str], ...], source: str) -> str:
    for old, new in texts:
        if text.count(old) != 1:
            raise ConversionError(f"{source}: {old!r} occurs {text.count(old)} times, not once")
        text = text.replace(old, new)
    return text


def convert(pair: Pair) -> str:
    source = replace_texts((ROOT / pair.source).read_text(), pair.texts, pair.source)
    names = {**NAMES, **pair.names}
    text, written_sync = keep_sync_branches(source)
    text = rewrite_tokens(text, names, written_sync)
    text = replace_docstring(text, pair.docstring, pair.source)
    text = header(pair) + ruff_fix(text, pair.target)
    verify(text, pair.target)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write: exit 1 if a generated module is out of date")
    args = parser.parse_args(argv)
    stale = 0
    for pair in PAIRS:
        wanted = convert(pair)
        path = ROOT / pair.target
        current = path.read_text() if path.exists() else ""
        if current == wanted:
            continue
        if args.check:
            stale += 1
            sys.stdout.writelines(difflib.unified_diff(
                current.splitlines(keepends=True), wanted.splitlines(keepends=True),
                f"{pair.target} (checked in)", f"{pair.target} (from {pair.source})"))
        else:
            path.write_text(wanted)
            print(f"wrote {pair.target} from {pair.source}")
    if stale:
        print(f"\n{stale} generated module(s) out of date: run `{COMMAND}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
