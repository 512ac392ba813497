"""librdkafka settings that run a command or load code: refused unless explicitly allowed.

Relay and consumer settings often come from environment variables or shared config files, so a
setting that executes something is treated as an attack until the operator says otherwise.
"""

from __future__ import annotations

from outbox.errors import ConfigurationError

UNSAFE_SETTINGS = frozenset(
    {
        "plugin.library.paths",
        "sasl.kerberos.kinit.cmd",
        "ssl.engine.location",
        "ssl.providers",
        "sasl.oauthbearer.config.file",
    }
)


def refuse_unsafe(key: str, *, allow_unsafe: bool) -> None:
    """Raise ConfigurationError for a setting in UNSAFE_SETTINGS unless `allow_unsafe`."""
    if key in UNSAFE_SETTINGS and not allow_unsafe:
        raise ConfigurationError(
            f"kafka setting {key!r} runs commands or loads libraries; it is refused unless "
            "allow_unsafe_kafka_settings is set"
        )


def parse_kafka_settings(items: list[str], setting: str = "kafka_setting") -> dict[str, str]:
    """`key=value` pairs (librdkafka names), as given on a command line, into a dict."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"{setting}={item!r} must look like key=value")
        parsed[key.strip()] = value.strip()
    return parsed
