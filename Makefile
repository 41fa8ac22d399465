# Set-up and the two jobs the README shows. TORCH_SPEC lets GPU users pick their own torch build,
# e.g. `make test TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test train lint format

# Fine-tunes the shipped toy base on the shipped subject with the script's defaults (CPU, about five
# minutes), except 32 class images instead of 100 (as benchmarks/quality.py measured the defaults) and 800
# steps instead of liera's 1200 (which take about seven and a half minutes).
train: setup
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		--num_cpu_threads_per_process 2 train_scripts/train_dreambooth_liera.py --output_dir outputs/dreambooth-liera \
		--num_class_images 32 --max_train_steps 800 --overwrite_output_dir

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[test]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .
