# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch and torchvision must come as a matching pair; override for other platforms,
# e.g. `make test TORCH="torch==2.9.1 torchvision==0.24.1"` on aarch64.
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?= -q -n 2

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

demo: $(STAMP)
	$(VENV)/bin/harden demo

clean:
	rm -rf $(VENV) runs .pytest_cache
