# Local Lambda targets for the functions, included by the top-level Makefile
# (`include mk/functions.mk`).
#
#   make watch [PORT=9001]                         cargo lambda watch on 127.0.0.1:PORT (all
#                                                  functions of the workspace, rebuilt on change)
#   make invoke FN=fraud EVENT=events/… [PORT=…]   cargo lambda invoke FN with that event file,
#                                                  against a running `make watch`
#   make invoke-check                              what CI runs: resources on moto, cargo lambda
#                                                  watch in the background, each function invoked
#                                                  with its samples, responses and side effects
#                                                  checked, watch stopped (mk/invoke_check.py)
#
# The functions read their resources from the environment: export them (AWS_ENDPOINT_URL,
# ALERTS_QUEUE_URL, CARD_STATE_TABLE, …) before `make watch`, or see mk/invoke_check.py for a set
# that points at moto. cargo-lambda comes from the repo's .venv (scripts/setup-tools.sh), whose
# bin goes first on PATH so cargo-lambda finds zig through `python3 -m ziglang`.
# invoke-check reuses a moto already running (SHARDWISE_MOTO_ENDPOINT, as `make test` exports
# it) or starts its own through scripts/moto.sh.

FUNCTIONS_ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))/..)
FUNCTIONS_VENV := $(FUNCTIONS_ROOT)/.venv
FUNCTIONS_ENV := PATH="$(FUNCTIONS_VENV)/bin:$$PATH"
PORT ?= 9001
FN ?=
EVENT ?=

.PHONY: watch invoke invoke-check

watch:
	@$(FUNCTIONS_ROOT)/scripts/setup-tools.sh
	cd $(FUNCTIONS_ROOT) && $(FUNCTIONS_ENV) cargo lambda watch -A 127.0.0.1 -P $(PORT)

invoke:
	@test -n "$(FN)" -a -n "$(EVENT)" || { echo "usage: make invoke FN=fraud|aggregation|canary EVENT=events/<file>.json [PORT=$(PORT)]"; exit 2; }
	cd $(FUNCTIONS_ROOT) && $(FUNCTIONS_ENV) cargo lambda invoke $(FN) \
	  --invoke-address 127.0.0.1 --invoke-port $(PORT) --data-file $(EVENT)

invoke-check:
	@$(FUNCTIONS_ROOT)/scripts/setup-tools.sh
	cd $(FUNCTIONS_ROOT) && if [ -n "$$SHARDWISE_MOTO_ENDPOINT" ]; then \
	  $(FUNCTIONS_ENV) python3 mk/invoke_check.py; \
	else \
	  $(FUNCTIONS_ENV) scripts/moto.sh run python3 mk/invoke_check.py; \
	fi
