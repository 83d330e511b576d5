# The local runner (crates/shardwise-local, binary `shardwise`), included by the top-level
# Makefile (`include mk/local.mk`). Nothing here needs AWS, an emulator or the network.
#
#   make demo [DURATION=60s] [RATE=300] [SHARDS=4] [WINDOW=10s] [PLAIN=5s] [CHECK=1]
#                        fraud + aggregation, as their real binaries with the local backends,
#                        under generated load (fraud patterns, poison records) on an embedded
#                        stream; live view; summary (records, alerts, windows, dead letters);
#                        CHECK=1 fails unless every record was acknowledged, poison was
#                        dead-lettered, alerts raised and windows written (what CI runs)
#   make run ARGS='…'    shardwise run (mappings from template.yaml), e.g.
#                        make run ARGS='--until-idle 2s --batch-size 50'
#   make loadgen [RATE=…] [DURATION=…]   generated load into the embedded stream (.shardwise/)
#   make plan [PLAN_ARGS='…']            shards, concurrency and cost for a workload
#   make dashboard-test  the demo's dashboard in headless Chromium (scripts/browser): live rows,
#                        counts against the demo's summary, dead letters with payloads, screenshot
#                        [DASHBOARD_SHOT=docs/img/dashboard.png DASHBOARD_LOAD=40] keeps the picture
#   make bench-local [BENCH_RATE=5000] [BENCH_DURATION=10s]
#                        end-to-end records/s and put-to-processed p50/p99 of the embedded pipeline
#   make conformance     the ESM conformance suite, the kill-and-resume test and the moto test
#                        (skipped without SHARDWISE_MOTO_ENDPOINT)
#
# Debug builds: the demo's load is small, and a debug build shares its dependencies with
# `cargo test`, where a release build of the workspace costs another 4–6 minutes on 2 cores.
# The functions are built with their `local` feature (the SQLite backends), which the Lambda
# build (sam build) leaves out.

comma := ,
empty :=
space := $(empty) $(empty)
LOCAL_ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))/..)
LOCAL_TARGET := $(or $(CARGO_TARGET_DIR),$(LOCAL_ROOT)/target)
SHARDWISE := $(LOCAL_TARGET)/debug/shardwise
# The functions the demo runs: those of fraud and aggregation whose crate has the `local`
# feature (the SQLite backends); a function without it cannot run here and is left out, with a note.
LOCAL_CANDIDATES := fraud aggregation
LOCAL_FUNCTIONS ?= $(foreach f,$(LOCAL_CANDIDATES),$(if $(shell grep -s '^local *=' $(LOCAL_ROOT)/functions/$(f)/Cargo.toml),$(f)))
DURATION ?= 60s
RATE ?= 300
SHARDS ?= 4
WINDOW ?= 10s
PLAIN ?=
CHECK ?=
ARGS ?=
PLAN_ARGS ?= --mb-per-sec 10 --records-per-sec 8000 --avg-record-kb 1 --consumers 3
BENCH_RATE ?= 5000
BENCH_DURATION ?= 10s
DASHBOARD_SHOT ?=
DASHBOARD_LOAD ?= 8

.PHONY: local-build demo run loadgen plan bench-local conformance dashboard-test

local-build:
	cd $(LOCAL_ROOT) && cargo build -p shardwise-local $(foreach f,$(LOCAL_FUNCTIONS),-p $(f)) \
	  --features "$(foreach f,$(LOCAL_FUNCTIONS),$(f)/local)"

demo: local-build
	@for f in $(filter-out $(LOCAL_FUNCTIONS),$(LOCAL_CANDIDATES)); do \
	  echo "note: functions/$$f has no local backends (cargo feature local) yet: left out of the demo"; \
	done
	cd $(LOCAL_ROOT) && $(SHARDWISE) demo --duration $(DURATION) --rate $(RATE) \
	  --shards $(SHARDS) --window $(WINDOW) --bin-dir $(LOCAL_TARGET)/debug \
	  --functions $(subst $(space),$(comma),$(strip $(LOCAL_FUNCTIONS))) $(if $(PLAIN),--plain $(PLAIN)) $(if $(CHECK),--check)

run: local-build
	cd $(LOCAL_ROOT) && $(SHARDWISE) run --bin-dir $(LOCAL_TARGET)/debug \
	  $(foreach f,$(LOCAL_FUNCTIONS),--function $(f)) $(ARGS)

loadgen: local-build
	cd $(LOCAL_ROOT) && $(SHARDWISE) loadgen --rate $(RATE) --duration $(DURATION) --shards $(SHARDS)

plan: local-build
	cd $(LOCAL_ROOT) && $(SHARDWISE) plan $(PLAN_ARGS)

dashboard-test: local-build
	cd $(LOCAL_ROOT) && SHARDWISE_BIN_DIR=$(LOCAL_TARGET)/debug SHARDWISE_DASHBOARD_LOAD=$(DASHBOARD_LOAD) \
	  $(if $(DASHBOARD_SHOT),SHARDWISE_DASHBOARD_SHOT=$(abspath $(DASHBOARD_SHOT))) \
	  PYTHONDONTWRITEBYTECODE=1 $(LOCAL_ROOT)/.venv/bin/python -m pytest -q -p no:cacheprovider scripts/browser

bench-local: local-build
	cd $(LOCAL_ROOT) && $(SHARDWISE) bench --rate $(BENCH_RATE) --duration $(BENCH_DURATION)

conformance:
	cd $(LOCAL_ROOT) && cargo test -p shardwise-local

