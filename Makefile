# The two commands of the README: `make demo` (see it work) and `make test` (the whole suite).
# Both bootstrap what they need: a virtualenv in .venv, the dependencies, the local stack.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Generated from aio.py and aio_stores.py by tools/async_to_sync.py; not in git. The (editable)
# install writes them (setup.py's build_sync step); sync-code rewrites them after an edit.
# ruff skips git-ignored files it finds itself, so lint names them: they are linted as any module.
GENERATED := outbox/consumer/runner.py outbox/consumer/stores.py

.PHONY: install native lint test test-unit sync-code demo bench browser stack-up stack-down stack-status clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) native

# The relay's compiled hot path (native/, Rust with pyo3: the WAL relay's row reader and the
# Kafka headers), built in place as relay/_native<EXT_SUFFIX> for the virtualenv's Python:
# ~20 s of CPU the first time, a no-op after. Without cargo the relay runs its pure-Python code
# (relay/wal/decoder.py, relay/sinks/kafka/sink.py), which gives the same results; a failed
# build fails here rather than leave a slower relay unnoticed. Copied, then renamed: a running
# relay keeps the file it loaded.
native: $(STAMP)
	@if command -v cargo >/dev/null; then \
	  suffix=$$($(PY) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))'); \
	  PYO3_PYTHON=$(abspath $(PY)) cargo build --release --quiet --manifest-path native/Cargo.toml && \
	  cp native/target/release/lib_native.so relay/_native$$suffix.tmp && \
	  mv relay/_native$$suffix.tmp relay/_native$$suffix; \
	else \
	  echo "cargo not found: the relay runs its pure-Python hot path"; \
	fi

lint: $(STAMP) sync-code
	$(PY) -m ruff check . $(GENERATED)
	$(PY) -m mypy

# Starts the local stack if it is not running, runs lint, types and every test, and stops the
# stack again only if this command started it.
test: $(STAMP) sync-code native
	$(PY) -m ruff check . $(GENERATED)
	$(PY) -m mypy
	@# The console's browser test needs chromium: installed here as root on Debian (like the
	@# PostgreSQL server binaries); elsewhere, or if apt fails, that one test skips saying why.
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then $(MAKE) --no-print-directory browser || true; fi
	@if $(PY) -m deploy.local status >/dev/null 2>&1; then started=0; else started=1; fi; \
	$(PY) -m deploy.local up || exit 1; \
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$started = 1 ]; then $(PY) -m deploy.local down; fi; \
	exit $$rc

test-unit: $(STAMP) sync-code native
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The operator console's browser test (tests/integration/test_console.py) drives Debian's
# chromium through chromedriver; without them it is skipped, saying so. `test` runs it only as
# root (CI); a developer's `make test` never asks for sudo.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
	  echo "chromium and chromedriver are installed"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
	  $$sudo apt-get update && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y \
	    --no-install-recommends chromium chromium-driver; \
	fi

# The synchronous consumer (outbox/consumer/runner.py, stores.py) is generated from the asyncio
# one (aio.py, aio_stores.py): rewritten here when an edit made them stale (lint and the tests run
# it first); tests/unit/test_generated_sync.py fails while they differ.
sync-code: $(STAMP)
	$(PY) tools/async_to_sync.py

demo: $(STAMP) native
	$(PY) -m deploy.local up
	$(PY) -m demo $(DEMO_ARGS)

bench: $(STAMP) native
	$(PY) -m deploy.local up
	$(PY) -m bench $(BENCH_ARGS)

stack-up: $(STAMP)
	$(PY) -m deploy.local up

stack-down: $(STAMP)
	$(PY) -m deploy.local down

stack-status: $(STAMP)
	$(PY) -m deploy.local status

clean:
	-$(PY) -m deploy.local down
	rm -rf .local $(VENV) .mypy_cache .ruff_cache .pytest_cache build $(GENERATED) native/target \
	  relay/_native*.so
