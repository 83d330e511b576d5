# Everyday targets. Every target here runs in CI (scripts/test.sh, through `make test`), or, for
# those that need an AWS account, is at least expanded there with `make -n`.
.DEFAULT_GOAL := help

include mk/sam.mk
include mk/functions.mk
include mk/local.mk
include mk/proof.mk

CARGO ?= cargo

.PHONY: help test lint bench fraud-eval

help:
	@echo "make demo      the local pipeline: embedded stream, fraud + aggregation, generated load, live dashboard"
	@echo "make dashboard-test   the demo's dashboard in headless Chromium (what CI runs)"
	@echo "make test      all tests and checks (what CI runs)"
	@echo "make lint      cargo fmt --check + clippy -D warnings"
	@echo "make bench     real-bootstrap, local-pipeline, hot-path and idempotency benchmarks (figures, plots in docs/img)"
	@echo "make fraud-eval [SEEDS='1 2 3']   fraud detection measured on the labelled set (recall, precision, FPR, time to alert)"
	@echo "make watch | invoke FN=… EVENT=…   cargo lambda watch / invoke"
	@echo "make build | validate | deploy ENV=… | logs FN=… | delete | redrive QUEUE_URL=…   SAM"
	@echo "make proptest-long | chaos | chaos-long | fuzz   the long proof runs (docs/proof.md)"

test:
	scripts/test.sh

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The fraud function replayed on the labelled evaluation set (functions/fraud/README.md,
# "Evaluation"): a table per seed, the score plots in functions/fraud/eval/; fails when a seed
# misses a target. Release, since it replays ~210,000 transactions per seed (~20 s each); CI runs
# the same evaluation on a reduced set in `cargo test` (functions/fraud/tests/eval.rs).
SEEDS ?= 1 2 3
fraud-eval:
	$(CARGO) run --release -p fraud --example fraud_eval -- $(foreach s,$(SEEDS),--seed $(s)) --plot functions/fraud/eval

# The idempotency bench counts DynamoDB calls against moto, so it runs under scripts/moto.sh.
# The bootstrap bench runs real bootstrap binaries against the local runner's Runtime API.
# Figures: the bootstrap bench and `shardwise bench` (once per offered rate) write CSV files to
# BENCH_FIGURES, which scripts/bench_plots.py turns into a table and SVG plots in BENCH_PLOTS
# (the README shows docs/img/). BENCH_SECONDS / BENCH_RECORDS shorten the bootstrap bench.
BENCH_FIGURES ?= $(LOCAL_TARGET)/bench-figures
BENCH_PLOTS ?= docs/img
BENCH_LOAD_RATES ?= 1000 2500 5000 10000
BENCH_LOAD_DURATION ?= 5s

bench: tools local-build
	rm -rf $(BENCH_FIGURES) && mkdir -p $(BENCH_FIGURES)
	BENCH_FIGURES=$(BENCH_FIGURES) $(CARGO) bench -p shardwise-bench --bench bootstrap
	for rate in $(BENCH_LOAD_RATES); do \
	  $(SHARDWISE) bench --rate $$rate --duration $(BENCH_LOAD_DURATION) \
	    --figures $(BENCH_FIGURES)/local.csv || exit 1; \
	done
	$(CARGO) bench -p shardwise --bench pipeline
	PATH="$(CURDIR)/.venv/bin:$$PATH" scripts/moto.sh run $(CARGO) bench -p shardwise-aws --bench idempotency
	python3 scripts/bench_plots.py $(BENCH_FIGURES) $(BENCH_PLOTS)
