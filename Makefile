# make run: create .venv, install frog (CPU torch pinned) and run the main job.
# make test: same install, then the test suite.
# make docs: same install plus the docs extra, then the documentation site (strict) into build/site.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test bench docs fashion-mnist

$(BIN)/.frog-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.frog-installed

run: install fashion-mnist
	$(BIN)/frog reproduce --quick --out runs/reproduce

# Fashion-MNIST comes from the Debian package dataset-fashion-mnist (best effort: root and apt-get);
# without it the quick reproduction skips its Fashion-MNIST part and says so.
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
	  || echo "note: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)"

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/engines.py

# mkdocs.yml, pages in docs/; --strict turns every warning (a broken link or anchor, a docstring
# griffe cannot read) into an error. NO_MKDOCS_2_WARNING silences Material's banner about MkDocs 2.
docs: install
	$(BIN)/pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site
