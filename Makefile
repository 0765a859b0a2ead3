# surrogate-serve: `make serve` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   ?= .venv
# make serve binds HOST:PORT: `make serve PORT=9000`, or the service's own SURROGATE_HOST / SURROGATE_PORT.
HOST   ?= $(or $(SURROGATE_HOST),127.0.0.1)
PORT   ?= $(or $(SURROGATE_PORT),8000)
BIN    := $(VENV)/bin
# Two installs, each with its stamp: the runtime (make install, make serve) and the development one (everything else).
RUNTIME_STAMP := $(VENV)/.installed-runtime
STAMP  := $(VENV)/.installed-dev
# requirements-dev.lock pins PyTorch's CPU build (torch==X+cpu), which PyPI does not host. It is taken from this
# index where the machine reaches it, else from pip's configured sources (a mirror, find-links); TORCH_CPU_INDEX=
# (empty) skips the index.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install serve test test-fast bench openapi lint docs notebook test-container clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"

# The runtime: exactly the pinned versions of requirements.lock, then the project and its client (editable).
$(RUNTIME_STAMP): $(BIN)/python requirements.lock pyproject.toml surrogate_client/pyproject.toml
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip install --quiet --no-deps -e ./surrogate_client
	touch $(RUNTIME_STAMP)

# Development: the runtime plus the test tools, exactly requirements-dev.lock; its torch first, from TORCH_CPU_INDEX
# where that answers (that index only for torch itself: its dependencies are pinned in the lock).
$(STAMP): $(RUNTIME_STAMP) requirements-dev.lock
	@torch=$$(grep -E '^torch==' requirements-dev.lock); \
	if [ -n "$(TORCH_CPU_INDEX)" ] && $(BIN)/python -c "import sys, urllib.request as u; \
	    u.urlopen(u.Request(sys.argv[1] + '/torch/', method='HEAD'), timeout=15)" "$(TORCH_CPU_INDEX)" 2>/dev/null; then \
	    echo "installing $$torch from $(TORCH_CPU_INDEX)"; \
	    $(BIN)/python -m pip install --quiet --no-deps --index-url "$(TORCH_CPU_INDEX)" "$$torch"; \
	else \
	    echo "installing $$torch from pip's configured sources (no answer from TORCH_CPU_INDEX=$(TORCH_CPU_INDEX))"; \
	    $(BIN)/python -m pip install --quiet --no-deps "$$torch"; \
	fi
	$(BIN)/python -m pip install --quiet -r requirements-dev.lock
	touch $(STAMP)

install: $(RUNTIME_STAMP)

serve: $(RUNTIME_STAMP)
	$(BIN)/python -m service --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e and not slow"

bench: $(STAMP)
	$(BIN)/python bench/bench.py

# Regenerates the checked-in contract from the app (review the diff before committing).
openapi: $(STAMP)
	$(BIN)/python -m service.contract > openapi.yaml

# Static checks of the packages (configured in pyproject.toml); not part of `make test`.
# Both run, whatever the first finds; the target fails if either does.
lint: $(STAMP)
	@status=0; \
	$(BIN)/ruff check surrogate_core service surrogate_client/src/surrogate_client tests/docs || status=1; \
	$(BIN)/mypy surrogate_core service surrogate_client/src/surrogate_client || status=1; \
	exit $$status

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or nav entry fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The documentation site at http://127.0.0.1:8002, rebuilt on every change (8000 and 8001 are make serve's).
.PHONY: docs-serve
docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8002

# Re-executes the notebooks (examples/*.ipynb) against the server at SURROGATE_URL (default: a `make serve`
# on 127.0.0.1:8000) and saves them with their outputs (review the diff before committing).
notebook: $(STAMP)
	$(BIN)/python tests/notebooks.py

test-container: $(STAMP)
	bash scripts/test-container.sh

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .hypothesis .ruff_cache .mypy_cache
