# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
#
# The virtual environment lives at a fixed path outside the clone (VENV), so repeated CI runs in fresh
# clones reuse one environment instead of building GBs each time. A stamp named after pyproject.toml's hash
# and this clone's path decides when to (re)install: new dependencies, or a new clone to point the editable
# install at.

PYTHON ?= python3
VENV ?= $(HOME)/.cache/batchlab/venv-full
BIN := $(VENV)/bin
# torchvision (for Ultralytics) works on this kind of machine only as torch 2.14.1 + torchvision 0.29.1, which lie
# on its disk (a CUDA build, ~5.5 GB, runs on the CPU); an unpinned torch would download another multi-GB build.
# On a GPU machine, install the torch you want first and set TORCH_SPEC= to keep it.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-10)-$(shell echo $(CURDIR) | sha1sum | cut -c1-10)
TORCH_OWN := ^(torch|torchvision|torchaudio|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==

.PHONY: install lock demo test lint format clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q $(TORCH_SPEC); fi
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

lock:
	@test -x $(BIN)/pip || { echo 'no venv at $(VENV): run make install first'; exit 1; }
	@{ echo "# Every package of the venv but torch's own, pinned: written by \`make lock\`, read by \`make install\`."; \
	  $(BIN)/pip freeze --exclude-editable | LC_ALL=C sort -f | grep -viE '$(TORCH_OWN)'; } > constraints.txt
	@echo "constraints.txt: $$(grep -vc '^#' constraints.txt) pins"

demo: install
	$(BIN)/batchlab fit --workload cnn --device cpu --memory-budget 2GiB

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports   # the layer contracts in pyproject.toml ([tool.importlinter])
	$(BIN)/vulture src vulture_whitelist.py --min-confidence 60   # dead code; the whitelist says why each is kept

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
