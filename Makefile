# mobiletune: `make demo` and `make test` work on a fresh clone with nothing installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED ?= $(abspath ../shared)
# Keras looks here for weights before it downloads them; local to the checkout, ignored by git.
export KERAS_HOME ?= $(CURDIR)/.keras-home
# Offline copies, used when present; elsewhere Keras downloads the weights and the demo data.
DEMO_DATA ?= $(wildcard $(SHARED)/data/cats_and_dogs_filtered)
RUN ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install weights demo test lint lock dist matrix mutate clean

# The exact versions of requirements.lock (tested on Python 3.11, x86-64 Linux), then mobiletune itself.
$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

install: $(BIN)/.installed

weights:
	@if [ -x "$(SHARED)/weights/install-into-keras-cache" ]; then \
		"$(SHARED)/weights/install-into-keras-cache" "$(KERAS_HOME)"; fi

demo: install weights
	$(BIN)/mobiletune train "$(or $(DEMO_DATA),$$($(BIN)/mobiletune fetch cats-and-dogs))" --out $(RUN)

# One pytest worker per core, each taking whole test files (their module fixtures are built once)
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)

test: install weights
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# requirements.lock again: the newest releases pyproject.toml's ranges allow (then run make test)
lock: install
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra mlflow --extra ray --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --upgrade --no-header --annotation-style line -o requirements.lock.new
	{ sed -n 1,2p requirements.lock; cat requirements.lock.new; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock && rm requirements.lock.new

# wheel and sdist in dist/
dist: install
	$(BIN)/python -m build --outdir dist

# the wheel and sdist on Python 3.10, 3.12 and 3.13, each in a clean venv, with a smoke test
matrix: install
	scripts/python-matrix

# mutation testing of the pure logic (split, statistics, trial choice, unknown threshold, labels CSV) with mutmut, on
# one worker: the score per module (scripts/mutate, docs/testing.md). Slow, so not part of `test` or CI.
MUTMUT_VERSION := 3.8.1
mutate: install
	@$(BIN)/python -c "import importlib.metadata as m; assert m.version('mutmut') == '$(MUTMUT_VERSION)'" 2>/dev/null \
		|| $(BIN)/pip install --quiet mutmut==$(MUTMUT_VERSION)
	MOBILETUNE_SHARED="$(SHARED)" $(BIN)/python scripts/mutate

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) .keras-home .pytest_cache dist build
