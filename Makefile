# Two entry points a fresh machine needs: `make demo` and `make test`; both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The lock tool lives in its own small venv, so `make lock` works before (and without) .venv.
LOCK_TOOLS := .lock-tools
UV := $(LOCK_TOOLS)/bin/uv
UV_VERSION := 0.13.9
COMPILE := $(UV) pip compile pyproject.toml --generate-hashes --python-version 3.11 \
	--custom-compile-command "make lock" --quiet $(if $(UPGRADE),--upgrade)

.PHONY: demo test lint bench reliability tools lock proto clean

# Exactly the locked versions, hash-checked; the project itself without dependencies.
$(STAMP): pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

$(UV):
	$(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/pip install -q 'uv==$(UV_VERSION)'

# Regenerate both lock files from pyproject.toml after changing a dependency, and commit them:
# requirements.lock (runtime + rocksdb: the Docker image) and requirements-dev.lock (dev +
# embedded: `make test`), constrained to the runtime versions so tests run what ships. Versions
# already locked are kept; `make lock UPGRADE=1` takes the newest allowed.
lock: $(UV)
	$(COMPILE) --extra rocksdb -o requirements.lock
	$(COMPILE) --extra rocksdb --extra dev -c requirements.lock -o requirements-dev.lock

# The Salesforce Pub/Sub API message classes from the official proto (checked in; run after changing
# the proto or grpcio-tools; tests/test_salesforce_cdc.py fails when the file is not current).
PROTO := streams/crm/pubsub/pubsub_api.proto
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. $(PROTO)

# promtool/prometheus (metric lint, rule tests, dashboard queries), amtool and alertmanager
# (Alertmanager config and delivery), nginx + openssl (the reverse-proxy example), stunnel4
# (Kafka over TLS), redis-server (the Redis sink, and the compose stack's password-protected
# Redis); Redis on 127.0.0.1:6379 for the sink tests.
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v amtool >/dev/null \
	  && command -v prometheus-alertmanager >/dev/null && PATH="$$PATH:/usr/sbin" command -v nginx >/dev/null \
	  && command -v openssl >/dev/null && command -v stunnel4 >/dev/null && command -v redis-server >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq prometheus prometheus-alertmanager nginx-light openssl stunnel4 redis-server >/dev/null; }
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || redis-server --daemonize yes --port 6379 --save ""

demo: $(STAMP)
	$(BIN)/funnel-kpi demo

# The suite in TEST_PROCESSES processes side by side (3 per core on the 2-core box: the end-to-end
# tests mostly wait on group joins, timeouts and sleeps); tests/conftest.py hands the end-to-end
# tests out first and keeps a module's tests that share a fixture in one process. Ends with the
# ten slowest tests. `make test TEST_PROCESSES=0` runs the suite in one process.
TEST_PROCESSES ?= 6
test: $(STAMP) tools
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n $(TEST_PROCESSES) --dist loadgroup --durations=10

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m bench.run

# Issue 7 end to end: crash, scale-out, outage, hostile input, restart, standby, erasure tests
# (all also in `make test`), then the 10-minute soak and the 1M-deal recovery bench (~25 min).
RELIABILITY_TESTS := tests/test_reliability_crash.py tests/test_reliability_scale.py \
	tests/test_reliability_outage.py tests/test_reliability_hostile.py tests/test_erasure.py \
	tests/test_e2e_pipeline.py::test_kill_9_mid_replay_then_restart_gives_the_literal_values \
	tests/test_e2e_pipeline.py::test_standby_replicas_are_never_exported \
	tests/test_e2e_pipeline.py::test_a_restarted_worker_recovers_every_deal_from_the_changelog \
	tests/test_e2e_outputs.py::test_redis_outage_never_stops_the_pipeline_and_redis_catches_up
reliability: $(STAMP) tools
	$(BIN)/pytest -q -s $(RELIABILITY_TESTS)
	$(BIN)/python -m bench.soak --minutes 10
	$(BIN)/python -m bench.recovery --deals 1000000

clean:
	rm -rf $(VENV) $(LOCK_TOOLS) data .pytest_cache
