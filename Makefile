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

.PHONY: install weights demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

weights:
	@if [ -x "$(SHARED)/weights/install-into-keras-cache" ]; then \
		"$(SHARED)/weights/install-into-keras-cache" "$(KERAS_HOME)"; fi

demo: install weights
	$(BIN)/mobiletune train "$(or $(DEMO_DATA),$$($(BIN)/mobiletune fetch cats-and-dogs))" --out $(RUN)

test: install weights
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) .keras-home .pytest_cache
