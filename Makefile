# Two commands: `make book` (set up, run every experiment of PROFILE, build the HTML book) and `make test`.
PROFILE ?= quick
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEBIAN_DATA := /usr/share/datasets/fashion-mnist

.PHONY: book test data setup clean-results

book: data
	$(BIN)/fmnist-book build --profile $(PROFILE)

test: data
	$(BIN)/python -m pytest -q

setup: $(STAMP)

# The package and its dependencies (torch and torchvision from the registry, together) into .venv/.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Fashion-MNIST: the user's directory ($$FMNIST_DATA_DIR), else Debian's package (installed here when
# possible), else torchvision's download; `fmnist-book data` verifies the files and says where they are.
data: $(STAMP)
	@if [ -z "$$FMNIST_DATA_DIR" ] && [ ! -d $(DEBIAN_DATA) ] && command -v apt-get >/dev/null 2>&1 \
	    && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi
	$(BIN)/fmnist-book data

clean-results:
	rm -rf results _build
