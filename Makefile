# minikd — two commands: `make lab` (learn) and `make test` (check everything, as CI does).
# Works on a fresh machine with only Python 3 and make: the first call creates .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.minikd-installed
# Nothing may download during tests (no model hub, no data set host); notebooks run in quick mode.
TEST_ENV := HF_HUB_OFFLINE=1 TQDM_DISABLE=1 MINIKD_MODE=quick MPLBACKEND=Agg PYTHONHASHSEED=0

.PHONY: lab test unit notebooks smoke lint venv clean zoo

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[notebooks,test]"
	@touch $(STAMP)

venv: $(STAMP)  ## create .venv and install minikd with its extras

# Jupyter refuses to run as root unless told; root is common in containers and cloud VMs.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)

lab: $(STAMP)  ## open JupyterLab on the notebooks (ToyCity data, no download)
	$(BIN)/jupyter lab $(LAB_ARGS) notebooks/

test: $(STAMP)  ## lint + unit tests + every notebook in quick mode (nbval) + every full mode (smoke)
	$(BIN)/ruff check minikd tests benchmarks data_scripts
	$(TEST_ENV) $(BIN)/python -m pytest tests
	$(TEST_ENV) $(BIN)/python -m pytest --nbval-lax --nbval-current-env \
		--nbval-sanitize-with notebooks/nbval_sanitize.cfg -p no:python notebooks
	$(MAKE) smoke

unit: $(STAMP)  ## unit tests only
	$(TEST_ENV) $(BIN)/python -m pytest tests

notebooks: $(STAMP)  ## notebooks only, through nbval in quick mode
	$(TEST_ENV) $(BIN)/python -m pytest --nbval-lax --nbval-current-env \
		--nbval-sanitize-with notebooks/nbval_sanitize.cfg -p no:python notebooks

# Full mode's code path with capped work, on fake Cityscapes/GTA5/NYUv2 downloads built from ToyCity
# scenes and prepared by data_scripts (a few minutes; no GPU, no real data). Each notebook runs
# under nbval; outputs are not compared.
SMOKE_DATA ?= data/fake
SMOKE_ENV := HF_HUB_OFFLINE=1 TQDM_DISABLE=1 MPLBACKEND=Agg PYTHONHASHSEED=0 MINIKD_SMOKE=1 \
	MINIKD_CITYSCAPES=$(abspath $(SMOKE_DATA))/cityscapes MINIKD_GTA5=$(abspath $(SMOKE_DATA))/gta5 \
	MINIKD_NYUV2=$(abspath $(SMOKE_DATA))/nyuv2

$(SMOKE_DATA)/.done: data_scripts/make_fake_archives.py
	$(BIN)/python data_scripts/make_fake_archives.py --out $(SMOKE_DATA)
	@touch $@

smoke: $(STAMP) $(SMOKE_DATA)/.done  ## every notebook's full mode end to end on fake data (MINIKD_SMOKE=1)
	$(SMOKE_ENV) $(BIN)/python -m pytest tests/test_full_mode_smoke.py -v --durations=0

# Retrain every zoo entry by its recipe and rewrite minikd/zoo/manifest.json (CPU: ~25 min each).
zoo: $(STAMP)  ## retrain the model zoo (one entry: python -m minikd.training zoo --train NAME)
	$(BIN)/python -m minikd.training zoo --train-all

lint: $(STAMP)
	$(BIN)/ruff check minikd tests benchmarks data_scripts

clean:
	rm -rf $(VENV) results .pytest_cache
