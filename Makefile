# kaiko-bridge developer entry points. `make demo` and `make test` work on a fresh machine
# with Python 3.11+, Java 17+ and Maven (the Kafka broker comes from Maven Central).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

HELM_VERSION := v3.16.4
HELM := .cache/bin/helm
# Prometheus 3.x's Go module version: promtool tests the alert rules, the server runs them
# against the bridge in tests/integration/test_prometheus.py.
PROMETHEUS_VERSION := v0.316.0
PROMTOOL := .cache/bin/promtool
PROMETHEUS := .cache/bin/prometheus

.PHONY: setup kafka helm promtool prometheus demo test lint unit integration faults replicas soak bench lock clean

$(STAMP): pyproject.toml dev/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' -e ./dev
	touch $(STAMP)

setup: $(STAMP)

kafka: setup
	$(BIN)/python -m bridgedev.localkafka fetch

# Helm, built from the Go module proxy (no binary downloads), to render and check the chart.
$(HELM):
	GOBIN=$(CURDIR)/.cache/bin go install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)

helm: $(HELM)

# promtool, built the same way, runs `promtool test rules` on the chart's alerts.
$(PROMTOOL):
	GOBIN=$(CURDIR)/.cache/bin go install github.com/prometheus/prometheus/cmd/promtool@$(PROMETHEUS_VERSION)

promtool: $(PROMTOOL)

$(PROMETHEUS):
	GOBIN=$(CURDIR)/.cache/bin go install github.com/prometheus/prometheus/cmd/prometheus@$(PROMETHEUS_VERSION)

prometheus: $(PROMETHEUS)

demo: kafka
	$(BIN)/kaiko-bridge demo

lint: setup
	$(BIN)/ruff check bridge dev tests bench
	$(BIN)/ruff format --check bridge dev tests bench
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q tests/unit

integration: kafka
	$(BIN)/pytest -q -m integration

# The fault suite alone: a 3-node cluster, broker and bridge kills, upstream faults, bad input.
faults: kafka
	$(BIN)/pytest -q -m faults

# Three replicas at the issue's scale (300 NAV symbols; CI runs the same test with 60).
replicas: kafka
	REPLICA_TEST_SYMBOLS=300 $(BIN)/pytest -q -s tests/faults/test_replicas.py

# The soak at full scale (30-60 minutes): every fault at once across three replicas, the
# settlement holder SIGKILLed 20 times, every broker down for a minute. Its figures go to
# .cache/soak/report.jsonl (docs/reliability.md); CI runs the same tests at SOAK_SCALE=ci.
SOAK_TESTS := tests/faults/test_soak.py tests/faults/test_soak_settlements.py \
  tests/faults/test_soak_outage.py
soak: kafka
	rm -f .cache/soak/report.jsonl
	SOAK_SCALE=full SOAK_REPORT=.cache/soak/report.jsonl $(BIN)/pytest -q -s $(SOAK_TESTS)

test: kafka helm promtool prometheus lint
	$(BIN)/pytest -q --durations=25

# The benchmark suite: writes .cache/bench/report.json and report.txt (about 20 minutes);
# BENCH_ARGS="--against REF" runs it on REF too, alternating, and compares.
bench: kafka
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# The image's dependency locks, with hashes (the Dockerfile installs from them).
lock: setup
	$(BIN)/pip install --quiet pip-tools
	$(BIN)/pip-compile --quiet --strip-extras --generate-hashes --no-emit-find-links \
	  --allow-unsafe --extra fast -o requirements.lock pyproject.toml
	$(BIN)/pip-compile --quiet --strip-extras --generate-hashes --no-emit-find-links \
	  --allow-unsafe --extra fast --extra sim -o requirements-sim.lock pyproject.toml

clean:
	$(BIN)/python -m bridgedev.localkafka stop || true
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache .hypothesis
