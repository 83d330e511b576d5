# SAM targets, included by the top-level Makefile (`include mk/sam.mk`).
#
#   make build [ENV=…]         sam build (ARCH=x86_64 builds for x86_64 instead of the env's
#                              Architecture; the CLI override replaces the env's parameter_overrides)
#   make validate              sam validate --lint + scripts/check_template.py + checkov
#   make check-template        scripts/check_template.py alone
#   make deploy ENV=staging    sam build + sam deploy --config-env staging (ENV defaults to default)
#   make logs FN=FraudFunction [ENV=…]   sam logs --tail for one function of the stack
#   make delete ENV=…          sam delete --config-env …
#   make redrive QUEUE_URL=… [DRY_RUN=1]   scripts/redrive.py: dead letters back onto the stream
#
# build, validate and check-template run offline; make test runs all three (scripts/test.sh).
# deploy, logs, delete and redrive need an AWS account and credentials.

SAM_ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))/..)
SAM_VENV := $(SAM_ROOT)/.venv
SAM_ENV := PATH="$(SAM_VENV)/bin:$$PATH" SAM_CLI_TELEMETRY=0
SAM_REGION ?= $(or $(AWS_REGION),$(AWS_DEFAULT_REGION),us-east-1)
ENV ?= default
ARCH ?=
FN ?=
QUEUE_URL ?=
DRY_RUN ?=

.PHONY: tools build validate check-template deploy logs delete redrive

tools:
	@$(SAM_ROOT)/scripts/setup-tools.sh

build: tools
	cd $(SAM_ROOT) && $(SAM_ENV) sam build --config-env $(ENV) \
	  $(if $(ARCH),--parameter-overrides Architecture=$(ARCH))

validate: tools check-template
	cd $(SAM_ROOT) && $(SAM_ENV) sam validate --lint --region $(SAM_REGION)
	cd $(SAM_ROOT) && $(SAM_ROOT)/.venv-checkov/bin/checkov -f template.yaml \
	  --framework cloudformation --skip-download --compact --quiet

check-template: tools
	cd $(SAM_ROOT) && $(SAM_VENV)/bin/python scripts/check_template.py

# Builds with the env's own parameter_overrides (ARCH is ignored here: set Architecture in
# samconfig.toml so the build and the deployed function agree).
deploy: tools
	cd $(SAM_ROOT) && $(SAM_ENV) sam build --config-env $(ENV)
	cd $(SAM_ROOT) && $(SAM_ENV) sam deploy --config-env $(ENV)

logs: tools
	@test -n "$(FN)" || { echo "usage: make logs FN=FraudFunction|AggregationFunction|CanaryFunction [ENV=…]"; exit 2; }
	cd $(SAM_ROOT) && $(SAM_ENV) sam logs --config-env $(ENV) --name $(FN) --tail

delete: tools
	cd $(SAM_ROOT) && $(SAM_ENV) sam delete --config-env $(ENV)

redrive: tools
	@test -n "$(QUEUE_URL)" || { echo "usage: make redrive QUEUE_URL=<stack output DeadLetterQueueUrl> [DRY_RUN=1]"; exit 2; }
	cd $(SAM_ROOT) && $(SAM_VENV)/bin/python scripts/redrive.py --queue-url "$(QUEUE_URL)" $(if $(DRY_RUN),--dry-run)
