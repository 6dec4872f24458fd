# The two commands of the README:
#   make run    set up .venv, then start a local top-level/secondary/enterprise hierarchy
#   make test   set up .venv, then lint, type-check and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint typecheck unit clean install loadtest bench-tools

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard proto/idis/v1/*.proto) $(wildcard resolver/*.pyx) $(wildcard resolver/*.pxd) $(wildcard bench/*.pyx)
	@# The compiled cache links OpenSSL's libcrypto (SHA-256 for signed batches): its headers.
	@test "$$IDIS_PURE_PYTHON" = 1 || test -e /usr/include/openssl/sha.h || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libssl-dev; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/idis-local --state-dir state

# With `make run` going in another terminal: load 20,000 identifiers into the enterprise node,
# then resolve them (batches of 100, Zipf popularity, 5% unknown) for 20 s, diffing all three
# nodes' metrics. Report and plot in ./loadtest-report/.
loadtest: $(STAMP)
	$(BIN)/idis-bench --target 127.0.0.1:2643 --prefix 88.100.1 --keys 20000 --load \
		--ca state/tls/ca.pem --identity 88.100.1/ADMIN --key state/keys/88.100.1_ADMIN.pem \
		--workload batch --batch-size 100 --not-found-share 0.05 --duration 20 \
		--metrics http://127.0.0.1:9641/metrics --metrics http://127.0.0.1:9642/metrics \
		--metrics http://127.0.0.1:9643/metrics --out loadtest-report

# The benchmarks' outside tools (Debian packages): wrk for bench.http_bench, Knot DNS and dnsperf
# for bench.knot_baseline. Installs them only when one is missing.
bench-tools:
	@missing=; for tool in wrk knotd dnsperf; do command -v $$tool >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y wrk knot dnsperf; fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

clean:
	rm -rf $(VENV) build *.egg-info proto/idis/v1/*_pb2*.py proto/idis/v1/*_pb2*.pyi
