# The two commands a newcomer needs:  `make demo`  and  `make test`.
# Both install what they need (virtualenv, npm packages, Maven artifacts, Debian packages)
# and start the local services they need; installs are cached, so reruns take seconds.

PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
PYTEST_ARGS ?=

.PHONY: lint demo test unit soak scale stack stack-down system-deps venv bench clean infra-tools

demo: venv stack
	$(BIN)/python -m archive_kms.demo

test: lint venv stack infra-tools
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# The gates (seconds): format and lint, the layers of docs/architecture.md as import
# contracts (.importlinter, ADR 0008), types (strict on crypto/, keys/, migration/).
lint: venv
	$(BIN)/ruff format --check --quiet .
	$(BIN)/ruff check --quiet .
	$(BIN)/lint-imports --config .importlinter
	$(BIN)/mypy
	$(BIN)/mypy flows

unit: venv
	$(BIN)/python -m pytest tests/unit tests/vectors $(PYTEST_ARGS)

# Long fault trials: kill -9 of a migration worker at random moments, then resume and
# check the invariants (tests/faults/test_random_kills.py; CI runs 30 of them in `make
# test`). ARCHIVE_KMS_SOAK_TRIALS (default 200), ARCHIVE_KMS_SOAK_SEED=<seed> replays one
# trial; the report is in .stack/soak-report.json.
SOAK_TRIALS ?= 200
soak: venv stack
	ARCHIVE_KMS_SOAK_TRIALS=$${ARCHIVE_KMS_SOAK_TRIALS:-$(SOAK_TRIALS)} ARCHIVE_KMS_FAULT_REPORT=$${ARCHIVE_KMS_FAULT_REPORT:-.stack/soak-report.json} \
	$(BIN)/python -m pytest tests/faults/test_random_kills.py -s -p no:cacheprovider $(PYTEST_ARGS)
	# and every named kill point of the erase and rotate flows (tests marked soak; `make test` runs a few)
	$(BIN)/python -m pytest tests/flows/test_lifecycle_crash.py -m soak -p no:cacheprovider $(PYTEST_ARGS)

# Many tenants at once (docs/capacity.md): bench/bench_scale.py onboards 10 tenants on 1
# worker, 10 on 2 workers and SCALE_TENANTS (default 100) on 2 workers, each on a private
# fleet (PostgreSQL database, Prefect server, process workers) over the shared services,
# checks every tenant and prints throughput, peak RSS and their ratios. CI runs the small
# version with a worker and a Dask worker killed (tests/flows/test_fleet.py).
SCALE_TENANTS ?= 100
scale: venv stack
	$(BIN)/python bench/bench_scale.py --tenants $(SCALE_TENANTS) $(SCALE_ARGS)

system-deps:
	bash localstack/system-deps.sh

venv: system-deps $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test,lint,postgres,dask]"
	rm -f $(VENV)/.installed-* && touch $@

# cfn-lint and checkov in their own virtualenv in the cache directory (installed once)
infra-tools: venv
	$(BIN)/python infra/checks.py --install

stack: venv
	$(BIN)/archive-kms stack up

stack-down:
	-$(BIN)/archive-kms stack down

bench: venv stack
	$(BIN)/python bench/bench_envelope.py

clean: stack-down
	rm -rf .stack $(VENV)
