# Two commands do all the set-up on a fresh machine:
#   make demo   -> venv, install, federated BAFFLE on digits next to a backprop baseline
#   make test   -> venv, install, the test suite
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,flower]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/baffle train --config configs/demo.toml --out runs/demo-baffle --overwrite
	$(BIN)/baffle train --config configs/demo.toml --method bp-fedsgd --out runs/demo-bp --overwrite
	$(BIN)/baffle compare runs/demo-baffle runs/demo-bp
	$(BIN)/baffle plot runs/demo-baffle runs/demo-bp --out runs/demo.png

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
