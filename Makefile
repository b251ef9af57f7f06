# Two commands for a newcomer: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedrad-installed

.PHONY: demo test lint install clean browser pacs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e . --group dev
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedrad demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Headless Chromium for the report and dashboard tests (Debian's package, as root).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

# A real PACS for the DICOMweb tests: Debian's Orthanc + DICOMweb plugin, nginx for HTTPS.
pacs:
	@{ command -v Orthanc && command -v nginx && \
	   test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so; } >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  --no-install-recommends orthanc orthanc-dicomweb nginx-light; }

test: lint browser pacs
	$(BIN)/pytest -q --durations=12 $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
