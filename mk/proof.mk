# Proof targets: the long property run and the fuzzers. Included by the top-level
# Makefile (`include mk/proof.mk`). docs/proof.md says what each checks and what the last runs
# found.
#
#   make proptest                  the property suites as CI runs them (debug, modest case counts)
#   make proptest-long             the processor under faults over >= 10,000 generated batches
#                                  (release; PROPTEST_LONG_CASES per mode, default 10,000; batches up to 10,000 records)
#   make chaos                     random SIGKILLs of the runner and function processes over the
#                                  local pipeline (test function on embedded + moto, and the real
#                                  fraud + aggregation), as CI runs it
#   make chaos-long                the same over CHAOS_LONG_RECORDS (10,000) records and
#                                  CHAOS_LONG_KILLS (60) kill events per set-up
#   make fuzz-build                the libFuzzer binaries, on the stable toolchain
#   make fuzz [FUZZ_SECONDS=600]   each target in turn for FUZZ_SECONDS, one core, niced
#   make fuzz-check                each target over its seeds and saved corpus only (a replay,
#                                  a few seconds once built)
#
# Fuzzing on stable: cargo-fuzz's default flags need nightly (-Zsanitizer), but the coverage
# instrumentation libFuzzer needs is plain LLVM passes that stable rustc accepts. This file sets
# those flags itself (what `cargo fuzz run -s none` sets), with `--target` so that build scripts
# and proc macros stay uninstrumented. No sanitizer runs (ASan needs nightly); the harness
# bounds every single allocation itself (fuzz/src/lib.rs) and libFuzzer bounds RSS and time.

PROOF_ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))/..)
PROOF_CARGO_ENV := CARGO_TARGET_DIR=$${CARGO_TARGET_DIR:-$(PROOF_ROOT)/target}
PROPTEST_LONG_CASES ?= 10000
PROPTEST_LONG_MAX_RECORDS ?= 10000

FUZZ_DIR := $(PROOF_ROOT)/fuzz
FUZZ_TARGET_DIR ?= $(FUZZ_DIR)/target
FUZZ_TRIPLE := $(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')
FUZZ_TARGETS ?= event kpl window_state
FUZZ_SECONDS ?= 600
FUZZ_BIN = $(FUZZ_TARGET_DIR)/$(FUZZ_TRIPLE)/release
, := ,
# RUSTFLAGS replaces the target rustflags of .cargo/config.toml, so its CPU features are
# repeated here: the fuzzed code is the code that ships (sonic-rs picks SIMD paths at compile
# time).
FUZZ_CPU_FLAGS := $(if $(findstring x86_64,$(FUZZ_TRIPLE)),-Ctarget-feature=+avx2$(,)+bmi1$(,)+bmi2$(,)+fma$(,)+lzcnt$(,)+pclmulqdq$(,)+popcnt$(,)+sse4.2)
FUZZ_RUSTFLAGS := -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth \
  --cfg fuzzing $(FUZZ_CPU_FLAGS)
# Per target: the longest input (a KPL aggregate needs room for many user records).
FUZZ_MAX_LEN_event := 16384
FUZZ_MAX_LEN_kpl := 65536
FUZZ_MAX_LEN_window_state := 16384
FUZZ_FLAGS = -rss_limit_mb=1024 -timeout=10 -print_final_stats=1

CHAOS_LONG_RECORDS ?= 10000
CHAOS_LONG_KILLS ?= 60

.PHONY: proptest proptest-long chaos chaos-long fuzz-build fuzz-seeds fuzz fuzz-check

proptest:
	cd $(PROOF_ROOT) && $(PROOF_CARGO_ENV) cargo test -p shardwise \
	  --test prop_processor --test prop_decoders -- --nocapture

proptest-long:
	cd $(PROOF_ROOT) && $(PROOF_CARGO_ENV) PROPTEST_CASES=$(PROPTEST_LONG_CASES) \
	  SHARDWISE_PROP_MAX_RECORDS=$(PROPTEST_LONG_MAX_RECORDS) \
	  cargo test --release -p shardwise --test prop_processor -- --nocapture --test-threads 1

# The moto set-up needs the emulator: scripts/moto.sh starts one for the run (on its own port, so
# it does not disturb a moto `make test` started).
# The real functions' test needs them built with their local backends, where it can find them.
CHAOS_BIN_DIR = $${CARGO_TARGET_DIR:-$(PROOF_ROOT)/target}/debug
CHAOS_ENV = PATH="$(PROOF_ROOT)/.venv/bin:$$PATH" SHARDWISE_REQUIRE_MOTO=1 SHARDWISE_REQUIRE_FUNCTIONS=1 \
  SHARDWISE_FUNCTIONS_BIN_DIR=$(CHAOS_BIN_DIR) $(PROOF_CARGO_ENV)
CHAOS_FUNCTIONS_BUILD = cargo build -p fraud -p aggregation --features fraud/local,aggregation/local

chaos:
	cd $(PROOF_ROOT) && $(PROOF_CARGO_ENV) $(CHAOS_FUNCTIONS_BUILD) && $(CHAOS_ENV) scripts/moto.sh run \
	  cargo test -p shardwise-local --test chaos -- --nocapture --test-threads 1

chaos-long:
	cd $(PROOF_ROOT) && $(PROOF_CARGO_ENV) $(CHAOS_FUNCTIONS_BUILD) && $(CHAOS_ENV) \
	  SHARDWISE_CHAOS_RECORDS=$(CHAOS_LONG_RECORDS) SHARDWISE_CHAOS_KILLS=$(CHAOS_LONG_KILLS) \
	  SHARDWISE_CHAOS_FUNCTION_RECORDS=$(CHAOS_LONG_RECORDS) scripts/moto.sh run \
	  cargo test -p shardwise-local --test chaos -- --nocapture --test-threads 1 survive_random_kills

fuzz-build:
	cd $(FUZZ_DIR) && CARGO_TARGET_DIR=$(FUZZ_TARGET_DIR) RUSTFLAGS="$(FUZZ_RUSTFLAGS)" \
	  nice cargo build --release --target $(FUZZ_TRIPLE) --bins

fuzz-seeds: fuzz-build
	SHARDWISE_FUZZ_SEEDS=$(FUZZ_DIR)/seeds $(FUZZ_BIN)/event

fuzz: fuzz-seeds
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_DIR)/corpus/$$t $(FUZZ_DIR)/artifacts/$$t; \
	  echo "==> fuzz $$t for $(FUZZ_SECONDS) s"; \
	  case $$t in event) len=$(FUZZ_MAX_LEN_event);; kpl) len=$(FUZZ_MAX_LEN_kpl);; *) len=$(FUZZ_MAX_LEN_window_state);; esac; \
	  nice -n 10 $(FUZZ_BIN)/$$t $(FUZZ_FLAGS) -max_len=$$len -max_total_time=$(FUZZ_SECONDS) \
	    -artifact_prefix=$(FUZZ_DIR)/artifacts/$$t/ \
	    $(FUZZ_DIR)/corpus/$$t $(FUZZ_DIR)/seeds/$$t || exit 1; \
	done

fuzz-check: fuzz-seeds
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_DIR)/corpus/$$t; \
	  echo "==> replay $$t"; \
	  $(FUZZ_BIN)/$$t $(FUZZ_FLAGS) -runs=0 $(FUZZ_DIR)/corpus/$$t $(FUZZ_DIR)/seeds/$$t || exit 1; \
	done
