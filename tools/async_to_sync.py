"""Generates the consumer's synchronous modules from their asyncio originals, as psycopg 3 does
(its tools/async_to_sync.py): the asyncio module is the one that is written, reviewed and kept in
git; the synchronous twin is a build output, not in git. The package's build runs this script
(setup.py's `build_sync` step, for wheels, sdists and editable installs alike), so it needs
nothing but the standard library: no ruff, nor the project's dependencies.

    python tools/async_to_sync.py           # write the synchronous modules in the source tree
                                            # (`make sync-code`; `make install` does it too)
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
Then the import block is sorted as ruff's isort sorts it, and the imports only the asyncio code
used are dropped (`tidy_imports`): the output is final and lint-clean as it is written. The result
must parse and may not hold any `async`/`await` or unmapped `Async...` name: the script fails
otherwise.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import io
import re
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
        f"# Not in git, written by the build and `make install`; do not edit: edit the original.\n"
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


# The import block is put right by this script itself, as ruff's isort and F401 would (ruff is
# not run: the package's build runs this script with nothing but setuptools installed).
# tests/unit/test_generated_sync.py lints the output with ruff, so a difference shows there.
FIRST_PARTY = ("outbox", "relay")
LINE_LENGTH = 100  # [tool.ruff] line-length
_NOQA = re.compile(r"#\s*noqa\b", re.I)


def _natural(text: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in re.split(r"(\d+)", text) if part)


def _name_key(name: str) -> tuple[object, ...]:
    return (_natural(name.lower()), _natural(name))


def _member_key(alias: ast.alias) -> tuple[object, ...]:
    # ruff's order-by-type: CONSTANTS, then Classes, then the rest.
    name = alias.name
    kind = (0 if len(name) > 1 and name.upper() == name and name.lower() != name
            else 1 if name[:1].isupper() else 2)
    return (kind, *_name_key(name), _natural(alias.asname or ""))


def _section(module: str, level: int) -> int:
    top = module.split(".")[0]
    if level:
        return 4  # local folder
    if top == "__future__":
        return 0
    if top in sys.stdlib_module_names:
        return 1
    return 3 if top in FIRST_PARTY else 2


def _used_names(tree: ast.Module, skip: set[int]) -> set[str]:
    """Every name the module refers to, outside the statements at the indices of `skip`."""
    used: set[str] = set()
    for index, statement in enumerate(tree.body):
        if index in skip:
            continue
        for node in ast.walk(statement):
            if isinstance(node, ast.Name):
                used.add(node.id)
            annotations: list[ast.expr | None] = []
            if isinstance(node, ast.arg | ast.AnnAssign):
                annotations = [node.annotation]
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                annotations = [node.returns]
            for annotation in annotations:  # "quoted" annotations count, as for ruff
                if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
                    used |= {n.id for n in ast.walk(ast.parse(annotation.value, mode="eval"))
                             if isinstance(n, ast.Name)}
            if (isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
                    and isinstance(node.value, ast.List | ast.Tuple)):
                used |= {e.value for e in node.value.elts
                         if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return used


def _format_from(module: str, aliases: list[ast.alias], wrap: bool) -> str:
    names = [a.name if a.asname is None else f"{a.name} as {a.asname}" for a in aliases]
    line = f"from {module} import {', '.join(names)}"
    if not wrap and len(line) <= LINE_LENGTH:
        return line + "\n"
    return f"from {module} import (\n" + "".join(f"    {n},\n" for n in names) + ")\n"


def tidy_imports(text: str, target: str) -> str:
    """The module's first block of imports sorted into ruff's (isort's) sections and order,
    imports the module no longer uses dropped (those only the asyncio code needed), and a
    `# noqa` dropped where its import is used after all (ruff's I001, F401, RUF100)."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    indices = [i for i, s in enumerate(tree.body) if isinstance(s, ast.Import | ast.ImportFrom)]
    if not indices:
        return text
    first = indices[0]
    block: list[ast.Import | ast.ImportFrom] = []
    for statement in tree.body[first:]:
        if not isinstance(statement, ast.Import | ast.ImportFrom):
            break
        block.append(statement)
    assert block[-1].end_lineno is not None
    start, end = block[0].lineno, block[-1].end_lineno
    # Comments in the block would have no place to go, but for a statement's own noqa.
    noqa: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO("".join(lines[start - 1 : end])).readline):
        if token.type != tokenize.COMMENT:
            continue
        row = token.start[0] + start - 1
        owner = [s for s in block if s.lineno == row == s.end_lineno]
        if not (owner and _NOQA.match(token.string)):
            raise ConversionError(f"{target}:{row}: a comment in the import block: "
                                  "only a single-line import's `# noqa` is supported")
        noqa[row] = token.string
    used = _used_names(tree, set(range(first, first + len(block))))

    # (section, kind: 0 `import`, 1 `from`, module) -> aliases, magic trailing comma, noqa
    groups: dict[tuple[int, int, str, str], tuple[list[ast.alias], bool, str]] = {}
    for statement in block:
        comment = noqa.get(statement.lineno, "")
        if isinstance(statement, ast.Import):
            for alias in statement.names:
                bound = alias.asname or alias.name.split(".")[0]
                if bound in used or comment:
                    key = (_section(alias.name, 0), 0, alias.name, alias.asname or "")
                    groups.setdefault(key, ([alias], False, comment if bound not in used else ""))
            continue
        module = "." * statement.level + (statement.module or "")
        segment = "".join(lines[statement.lineno - 1 : statement.end_lineno])
        trailing_comma = re.search(r",\s*\)\s*(#.*)?$", segment.strip()) is not None
        for alias in statement.names:
            bound = alias.asname or alias.name
            if not (bound in used or comment or module == "__future__"):
                continue
            # Aliased names get their own statement (ruff's combine-as-imports = false).
            key = (_section(module, statement.level), 1, module, alias.asname or "")
            aliases, wrap, note = groups.setdefault(key, ([], False, ""))
            if all((a.name, a.asname) != (alias.name, alias.asname) for a in aliases):
                aliases.append(alias)
            if comment and bound not in used:
                note = comment
            groups[key] = (aliases, wrap or trailing_comma, note)

    sections: dict[int, list[tuple[tuple[object, ...], str]]] = {}
    for (section, kind, module, asname), (aliases, wrap, note) in groups.items():
        aliases = sorted(aliases, key=_member_key)
        if kind == 0:
            rendered = f"import {module}" + (f" as {asname}" if asname else "") + "\n"
        else:
            rendered = _format_from(module, aliases, wrap)
        if note:
            if rendered.count("\n") > 1:
                raise ConversionError(f"{target}: a `# noqa` on a wrapped import")
            rendered = rendered[:-1] + f"  {note}\n"
        level = len(module) - len(module.lstrip("."))  # relative: the furthest first, as ruff
        sort_key = (kind, *_name_key(module.lstrip(".")), -level,
                    _member_key(aliases[0]) if kind else (), _natural(asname))
        sections.setdefault(section, []).append((sort_key, rendered))
    tidy = "\n".join("".join(r for _, r in sorted(sections[s], key=lambda e: e[0]))
                     for s in sorted(sections))
    return "".join(lines[: start - 1]) + tidy + "".join(lines[end:])


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
    text = header(pair) + tidy_imports(text, pair.target)
    verify(text, pair.target)
    return text


def write(pair: Pair, directory: Path = ROOT) -> bool:
    """Write `pair`'s synchronous module under `directory` (the source tree, or a build's lib
    directory for setup.py); returns whether the file changed. An unchanged file is not touched."""
    wanted = convert(pair)
    path = directory / pair.target
    if path.exists() and path.read_text() == wanted:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(wanted)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write: exit 1 if a generated module is missing or out of date")
    args = parser.parse_args(argv)
    stale = 0
    for pair in PAIRS:
        if not args.check:
            if write(pair):
                print(f"wrote {pair.target} from {pair.source}")
            continue
        wanted = convert(pair)
        path = ROOT / pair.target
        current = path.read_text() if path.exists() else ""
        if current != wanted:
            stale += 1
            sys.stdout.writelines(difflib.unified_diff(
                current.splitlines(keepends=True), wanted.splitlines(keepends=True),
                f"{pair.target} (on disk)", f"{pair.target} (from {pair.source})"))
    if stale:
        print(f"\n{stale} generated module(s) out of date: run `{COMMAND}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
