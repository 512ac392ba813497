"""`outbox asyncapi`: write the AsyncAPI 3.0 document of an application's event registry."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from outbox.cli_errors import explain, fail
from outbox.contracts import asyncapi
from outbox.contracts.registry import EventRegistry, default_registry
from outbox.errors import ConfigurationError, MissingExtraError, OutboxError

YAML_EXTRA = "outbox-relay[asyncapi]"


def load_registry(spec: str) -> EventRegistry:
    """`package.module:name` (an EventRegistry), or `package.module` for the default registry
    that `@outbox.event_type` fills while the module is imported."""
    module_name, _, attribute = spec.partition(":")
    if not module_name:
        raise ConfigurationError(
            f"--app {spec!r}: write module:registry, e.g. shop.events:registry")
    # Like other `module:object` loaders, the working directory is importable.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"--app {spec!r}: cannot import {module_name}: {exc}") from exc
    if not attribute:
        return default_registry
    found: Any = getattr(module, attribute, None)
    if not isinstance(found, EventRegistry):
        raise ConfigurationError(
            f"--app {spec!r}: {module_name}.{attribute} is "
            f"{'missing' if found is None else type(found).__name__}, not an outbox.EventRegistry")
    return found


def render(document: dict[str, Any], output_format: str) -> str:
    if output_format == "json":
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    try:
        import yaml
    except ImportError as exc:
        raise MissingExtraError(
            f"--format yaml needs PyYAML: pip install '{YAML_EXTRA}', or use --format json"
        ) from exc
    text: str = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
    return text


def asyncapi_command(
    app_spec: Annotated[str, typer.Option(
        "--app", envvar="OUTBOX_ASYNCAPI_APP", show_envvar=True,
        help="module:registry (an outbox.EventRegistry), or a module whose import declares "
             "events with @outbox.event_type (the default registry).")],
    output_format: Annotated[str, typer.Option(
        "--format", envvar="OUTBOX_ASYNCAPI_FORMAT", show_envvar=True,
        help="yaml | json")] = "yaml",
    topic_template: Annotated[str, typer.Option(
        envvar="OUTBOX_TOPIC_TEMPLATE", show_envvar=True,
        help="The relay's --topic-template: the topic (channel) of each event type.",
    )] = asyncapi.DEFAULT_TOPIC_TEMPLATE,
    title: Annotated[str | None, typer.Option(
        envvar="OUTBOX_ASYNCAPI_TITLE", show_envvar=True,
        help="info.title (default: the registry's title).")] = None,
    api_version: Annotated[str, typer.Option(
        envvar="OUTBOX_ASYNCAPI_VERSION", show_envvar=True,
        help="info.version: the version of this messaging API.")] = "1.0.0",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", envvar="OUTBOX_ASYNCAPI_OUTPUT", show_envvar=True,
        help="File to write (default: standard output).")] = None,
) -> None:
    """Write the AsyncAPI 3.0 document of the events an application publishes and consumes."""
    try:
        if output_format not in ("yaml", "json"):
            raise ConfigurationError(f"--format {output_format!r}: choose yaml or json")
        registry = load_registry(app_spec)
        if not len(registry):
            raise ConfigurationError(f"--app {app_spec!r}: the registry declares no event type")
        text = render(asyncapi.document(registry, topic_template=topic_template, title=title,
                                        version=api_version), output_format)
    except OutboxError as exc:
        fail(explain(exc))
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
