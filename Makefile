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

# etcd, kube-apiserver and kubectl for `make k8s`, built from the Go module proxy through
# dev/kube/go.mod (about 10 minutes the first time) into a per-user cache that a fresh clone
# finds, with the Prometheus operator's CRDs (from its Go module) beside them.
KUBE_VERSION := $(shell sed -n 's/.*k8s\.io\/kubernetes \(v[0-9.]*\).*/\1/p' dev/kube/go.mod)
KUBE_BIN := $(or $(BRIDGE_KUBE_BIN),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/kaiko-bridge/kube-$(KUBE_VERSION))
KUBE_STAMP := gitVersion=$(KUBE_VERSION) gitMajor=1 gitMinor=$(word 2,$(subst ., ,$(KUBE_VERSION))) gitTreeState=clean
KUBE_LDFLAGS := $(foreach pkg,k8s.io/component-base/version k8s.io/client-go/pkg/version,$(addprefix -X $(pkg).,$(KUBE_STAMP)))
PROMETHEUS_OPERATOR := github.com/prometheus-operator/prometheus-operator@v0.85.0
CRDS := monitoring.coreos.com_servicemonitors.yaml monitoring.coreos.com_prometheusrules.yaml

.PHONY: setup kafka helm promtool prometheus kube k8s demo test lint unit integration faults replicas soak bench lock clean

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

$(KUBE_BIN)/kube-apiserver:
	mkdir -p $(@D) && cd dev/kube && go build -trimpath -ldflags "$(KUBE_LDFLAGS)" -o $@ k8s.io/kubernetes/cmd/kube-apiserver

$(KUBE_BIN)/kubectl:
	mkdir -p $(@D) && cd dev/kube && go build -trimpath -ldflags "$(KUBE_LDFLAGS)" -o $@ k8s.io/kubernetes/cmd/kubectl

$(KUBE_BIN)/etcd:
	mkdir -p $(@D) && cd dev/kube && go build -trimpath -o $@ go.etcd.io/etcd/server/v3

$(addprefix $(KUBE_BIN)/,$(CRDS)):
	mkdir -p $(KUBE_BIN)
	cp "$$(cd $(KUBE_BIN) && GOFLAGS=-mod=mod go mod download -json $(PROMETHEUS_OPERATOR) \
	  | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')/example/prometheus-operator-crd/$(@F)" $@
	chmod 644 $@

kube: $(KUBE_BIN)/kube-apiserver $(KUBE_BIN)/kubectl $(KUBE_BIN)/etcd $(addprefix $(KUBE_BIN)/,$(CRDS))

# The rendered chart, every optional part on, applied with a server-side dry run to a real
# kube-apiserver and etcd on loopback.
k8s: setup helm kube
	$(BIN)/python -m bridgedev.kube dry-run

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
