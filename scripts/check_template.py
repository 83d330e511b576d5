#!/usr/bin/env python3
"""Offline checks of template.yaml that neither `sam validate --lint` nor cfn-lint make.

cfn-lint on a SAM template does not see the resources SAM generates: a StartingPosition of NEWEST
or a BatchSize of 20000 on a Kinesis event passes it. So this script

1. transforms the SAM template to plain CloudFormation with aws-sam-translator, offline (local
   CodeUri values are swapped for an s3:// URI first, as `sam validate` does);
2. runs cfn-lint on the result;
3. asserts what Shardwise relies on, on the generated resources:
   - every AWS::Lambda::EventSourceMapping bisects failed batches, has finite retries and record
     age, reports batch item failures, sends on-failure records to an SQS queue that is not our
     payload dead-letter queue, and has valid StartingPosition, BatchSize, batching window and
     parallelization; the aggregation mapping has a tumbling window;
   - no IAM statement allows a data-plane action (kinesis:Get*/Put*, dynamodb:*Item*, sqs:Send*,
     kms:Decrypt, ...) on every resource, and no role carries an AWS managed policy that does;
   - the functions get the environment variables the Rust code reads, pointing at tables with the
     keys the code expects;
   - the alarms and dashboard cover the metrics the issue asks for.

Values given as parameter references are checked for every value they can take: the parameter's
default, every `parameter_overrides` entry in samconfig.toml, and the parameter's bounds
(AllowedValues or MinValue/MaxValue), so an unbounded parameter fails too.

Usage: scripts/check_template.py [--template template.yaml] [--samconfig samconfig.toml]
       [--output translated.json] [--skip-cfn-lint] [--skip-assertions]
Exit status 0 when every check passed, 1 otherwise; each failure names the rule and where.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

ROOT = Path(__file__).resolve().parent.parent
FAKE_CODE_URI = "s3://shardwise-template-check/code.zip"

# What the Rust code expects (keep in step with functions/*/src/main.rs and crates/shardwise).
STREAM_BINARIES = ("fraud", "aggregation")
WINDOWED_BINARIES = ("aggregation",)
COMMON_ENV = (
    "DEAD_LETTER_QUEUE_URL",
    "IDEMPOTENCY_TABLE",
    "RUST_LOG",
    "SHARDWISE_METRICS_NAMESPACE",
    "SHARDWISE_MAX_CONCURRENCY",
    "SHARDWISE_DEADLINE_MARGIN_MS",
)
FUNCTION_ENV = {
    "fraud": ("ALERTS_QUEUE_URL", "CARD_STATE_TABLE", "CANARY_TABLE"),
    "aggregation": ("AGGREGATES_TABLE", "CANARY_TABLE"),
    "canary": ("STREAM_NAME", "CANARY_TABLE"),
}
# env var -> (partition key, sort key or None, TTL attribute or None)
TABLE_KEYS = {
    "IDEMPOTENCY_TABLE": ("id", None, "expiration"),
    "CARD_STATE_TABLE": ("card_id", None, None),
    "AGGREGATES_TABLE": ("id", None, None),
    "CANARY_TABLE": ("canary_id", "consumer", "expiration"),
}
EMF_METRICS = (
    "RecordsProcessed",
    "RecordsFailed",
    "RecordsDeadLettered",
    "BatchDuration",
    "MaxRecordAge",
    "CanaryLatency",
    "CanaryMissing",
)
CANARY_CONSUMERS = ("fraud", "aggregation")
ITERATOR_AGE_MAX_THRESHOLD_MS = 30_000

# Concrete data-plane actions; a statement's action pattern (kinesis:Get*, dynamodb:*, *) that
# matches any of these is a data-plane statement.
DATA_PLANE_ACTIONS = (
    "kinesis:GetRecords",
    "kinesis:GetShardIterator",
    "kinesis:PutRecord",
    "kinesis:PutRecords",
    "kinesis:SubscribeToShard",
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",
    "dynamodb:BatchGetItem",
    "dynamodb:BatchWriteItem",
    "dynamodb:ConditionCheckItem",
    "dynamodb:Query",
    "dynamodb:Scan",
    "dynamodb:PartiQLSelect",
    "dynamodb:PartiQLInsert",
    "dynamodb:PartiQLUpdate",
    "dynamodb:PartiQLDelete",
    "sqs:SendMessage",
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibility",
    "kms:Decrypt",
    "kms:Encrypt",
    "kms:GenerateDataKey",
    "s3:GetObject",
    "s3:PutObject",
)
# AWS managed policies that grant data-plane actions on every resource.
BROAD_MANAGED_POLICY = re.compile(
    r"(AWSLambdaKinesisExecutionRole|AWSLambdaDynamoDBExecutionRole|AWSLambdaSQSQueueExecutionRole"
    r"|AdministratorAccess|PowerUserAccess|FullAccess|ReadOnlyAccess)$"
)

VALID_STARTING_POSITIONS = ("TRIM_HORIZON", "LATEST", "AT_TIMESTAMP")


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)
    passed: int = 0

    def check(self, ok: bool, rule: str, where: str, message: str) -> bool:
        if ok:
            self.passed += 1
        else:
            self.failures.append(f"FAIL [{rule}] {where}: {message}")
        return ok


# ------------------------------------------------------------------ loading and transforming


def load_template(path: Path) -> tuple[dict, dict]:
    """Returns (plain dict, decoded dict whose nodes remember their line numbers)."""
    from cfnlint.decode import decode

    decoded, errors = decode(str(path))
    if errors or decoded is None:
        raise SystemExit(f"check_template: cannot parse {path}: {[str(e) for e in errors or []]}")
    return json.loads(json.dumps(decoded)), decoded


def line_of(decoded: dict, *path: str) -> int | None:
    node: Any = decoded
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    mark = getattr(node, "start_mark", None)
    return mark.line + 1 if mark is not None else None


def swap_local_code_uris(template: dict) -> dict:
    """aws-sam-translator needs S3 code locations; local paths are only for `sam build`."""
    template = copy.deepcopy(template)
    globals_fn = template.get("Globals", {}).get("Function", {})
    if isinstance(globals_fn.get("CodeUri"), str) and not globals_fn["CodeUri"].startswith("s3://"):
        globals_fn["CodeUri"] = FAKE_CODE_URI
    for resource in template.get("Resources", {}).values():
        if resource.get("Type") == "AWS::Serverless::Function":
            props = resource.setdefault("Properties", {})
            code_uri = props.get("CodeUri")
            if code_uri is None or (isinstance(code_uri, str) and not code_uri.startswith("s3://")):
                props["CodeUri"] = FAKE_CODE_URI
    return template


def translate(template: dict, region: str) -> dict:
    os.environ.setdefault("AWS_DEFAULT_REGION", region)
    from samtranslator.parser.parser import Parser
    from samtranslator.public.exceptions import InvalidDocumentException
    from samtranslator.translator.translator import Translator

    try:
        return Translator(None, Parser()).translate(
            swap_local_code_uris(template),
            parameter_values={},
            get_managed_policy_map=lambda: {},
        )
    except InvalidDocumentException as exc:
        causes = "\n  ".join(cause.message for cause in exc.causes)
        raise SystemExit(f"check_template: aws-sam-translator rejected the template:\n  {causes}")


def run_cfn_lint(translated_path: Path, region: str, report: Report) -> None:
    exe = Path(sys.executable).with_name("cfn-lint")
    cmd = [str(exe) if exe.exists() else (shutil.which("cfn-lint") or "cfn-lint")]
    cmd += ["--regions", region, "--format", "json", "--", str(translated_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    try:
        findings = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        findings = None
    if findings is None or (proc.returncode != 0 and not findings):
        report.check(False, "cfn-lint", str(translated_path), f"cfn-lint failed to run:\n{proc.stdout}{proc.stderr}")
        return
    for finding in findings:
        location = finding.get("Location", {})
        path = "/".join(str(p) for p in location.get("Path") or [])
        line = (location.get("Start") or {}).get("LineNumber")
        rule = (finding.get("Rule") or {}).get("Id", "?")
        report.check(False, f"cfn-lint {rule}", f"{path} ({translated_path.name}:{line})", finding.get("Message", ""))
    if not findings:
        report.check(True, "cfn-lint", str(translated_path), "")
        print("check_template: cfn-lint on the transformed template: clean")


# ------------------------------------------------------------------ parameter resolution


def samconfig_overrides(path: Path | None) -> dict[str, dict[str, str]]:
    """{config env: {parameter: value}} from every parameter_overrides in samconfig.toml."""
    if path is None or not path.exists():
        return {}
    config = tomllib.loads(path.read_text())
    result: dict[str, dict[str, str]] = {}
    for env, commands in config.items():
        if not isinstance(commands, dict):
            continue
        for command, section in commands.items():
            raw = (section or {}).get("parameters", {}).get("parameter_overrides")
            if raw is None:
                continue
            items = raw if isinstance(raw, list) else shlex.split(raw)
            for item in items:
                for token in shlex.split(item) if isinstance(raw, list) else [item]:
                    key, sep, value = token.partition("=")
                    if sep:
                        result.setdefault(f"{env}.{command}", {})[key] = value
    return result


class Resolver:
    """Every concrete value a property can take at deploy time, each with where it came from."""

    NO_VALUE = object()

    def __init__(self, template: dict, overrides: dict[str, dict[str, str]]):
        self.parameters: dict = template.get("Parameters", {})
        self.overrides = overrides

    def candidates(self, value: Any, bounds: bool = True) -> list[tuple[str, Any]]:
        """bounds=False: only the values our own deployments use (default and samconfig), for
        policies a user may deliberately loosen, such as an alarm threshold."""
        if isinstance(value, dict) and len(value) == 1:
            ((fn, arg),) = value.items()
            if fn == "Ref" and arg == "AWS::NoValue":
                return [("AWS::NoValue", self.NO_VALUE)]
            if fn == "Ref" and arg in self.parameters:
                return self._parameter_candidates(arg, bounds)
            if fn == "Fn::If" and isinstance(arg, list) and len(arg) == 3:
                return self.candidates(arg[1], bounds) + self.candidates(arg[2], bounds)
            return [(f"unresolved {fn}", None)]
        return [("literal", value)]

    def _parameter_candidates(self, name: str, bounds: bool) -> list[tuple[str, Any]]:
        param = self.parameters[name]
        found: list[tuple[str, Any]] = []
        if "Default" in param:
            found.append((f"parameter {name} default", param["Default"]))
        for env, values in self.overrides.items():
            if name in values:
                found.append((f"parameter {name} in samconfig [{env}]", values[name]))
        if not bounds:
            return found
        if "AllowedValues" in param:
            found += [(f"parameter {name} AllowedValues", v) for v in param["AllowedValues"]]
        elif param.get("Type") == "Number":
            for bound in ("MinValue", "MaxValue"):
                if bound in param:
                    found.append((f"parameter {name} {bound}", param[bound]))
                else:
                    found.append((f"parameter {name} has no {bound}, so any value", None))
        else:
            found.append((f"parameter {name} is an unconstrained {param.get('Type', 'String')}", None))
        return found


def as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None


# ------------------------------------------------------------------ references


def ref_target(value: Any) -> str | None:
    """Logical id behind a Ref or GetAtt (or None)."""
    if isinstance(value, dict) and len(value) == 1:
        ((fn, arg),) = value.items()
        if fn == "Ref" and isinstance(arg, str):
            return arg
        if fn == "Fn::GetAtt":
            if isinstance(arg, list) and arg:
                return arg[0]
            if isinstance(arg, str):
                return arg.split(".", 1)[0]
    return None


def text_of(value: Any) -> str:
    """A string's shape for pattern checks: Sub templates as written, references as <Name>."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        ((fn, arg),) = value.items()
        if fn == "Fn::Sub":
            return arg if isinstance(arg, str) else str(arg[0])
        if fn == "Fn::Join" and isinstance(arg, list) and len(arg) == 2:
            return str(arg[0]).join(text_of(part) for part in arg[1])
        target = ref_target(value)
        if target:
            return f"<{target}>"
    return json.dumps(value)


def as_list(value: Any) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


# ------------------------------------------------------------------ the assertions


class Checker:
    def __init__(self, source: dict, decoded: dict, translated: dict, overrides, report: Report, name: str):
        self.source = source
        self.decoded = decoded
        self.resources: dict = translated.get("Resources", {})
        self.resolver = Resolver(translated, overrides)
        self.report = report
        self.name = name

    # Where a generated resource came from, for messages.
    def where(self, logical_id: str, *path: str) -> str:
        line = line_of(self.decoded, "Resources", logical_id, *path)
        return f"{logical_id} ({self.name}:{line})" if line else logical_id

    def binary_of(self, function_id: str) -> str | None:
        meta = self.source.get("Resources", {}).get(function_id, {}).get("Metadata", {})
        return (meta.get("BuildProperties") or {}).get("Binary")

    def functions(self) -> dict[str, str]:
        """Generated AWS::Lambda::Function logical id -> binary name."""
        return {
            lid: self.binary_of(lid) or lid
            for lid, res in self.resources.items()
            if res.get("Type") == "AWS::Lambda::Function"
        }

    def resources_of(self, kind: str) -> Iterator[tuple[str, dict]]:
        for lid, res in self.resources.items():
            if res.get("Type") == kind:
                yield lid, res.get("Properties", {})

    def run(self) -> None:
        self.check_event_source_mappings()
        self.check_iam()
        self.check_function_contract()
        self.check_alarms()
        self.check_dashboard()

    # -------------------------------------------------------------- event source mappings

    def esm_source(self, esm_id: str, function_id: str) -> tuple[str, ...]:
        events = self.source.get("Resources", {}).get(function_id, {}).get("Properties", {}).get("Events", {})
        for event in events:
            if f"{function_id}{event}" == esm_id:
                return (function_id, "Properties", "Events", event)
        return (esm_id,)

    def ranged(self, where: str, props: dict, key: str, lo: int, hi: int, required: bool) -> None:
        rule = f"esm.{key}"
        if key not in props:
            self.report.check(not required, rule, where, f"{key} is missing (must be {lo}..{hi})")
            return
        for origin, value in self.resolver.candidates(props[key]):
            if value is Resolver.NO_VALUE:
                self.report.check(not required, rule, where, f"{key} may be absent ({origin})")
                continue
            number = as_int(value)
            self.report.check(
                number is not None and lo <= number <= hi,
                rule,
                where,
                f"{key} = {value!r} from {origin}; must be {lo}..{hi}",
            )

    def check_event_source_mappings(self) -> None:
        esms = list(self.resources_of("AWS::Lambda::EventSourceMapping"))
        mapped_binaries: dict[str, int] = {}
        queue_urls = self.dead_letter_queues()
        for esm_id, props in esms:
            function_id = ref_target(props.get("FunctionName")) or "?"
            binary = self.binary_of(function_id) or function_id
            mapped_binaries[binary] = mapped_binaries.get(binary, 0) + 1
            src = self.esm_source(esm_id, function_id)
            line = line_of(self.decoded, "Resources", *src)
            where = f"{esm_id} (from {'.'.join(p for p in src if p != 'Properties')}, {self.name}:{line})"

            for origin, value in self.resolver.candidates(props.get("BisectBatchOnFunctionError", False)):
                self.report.check(
                    as_bool(value) is True,
                    "esm.BisectBatchOnFunctionError",
                    where,
                    f"must be true, is {value!r} ({origin})",
                )
            self.ranged(where, props, "MaximumRetryAttempts", 0, 10_000, required=True)
            self.ranged(where, props, "MaximumRecordAgeInSeconds", 60, 604_800, required=True)
            self.ranged(where, props, "BatchSize", 1, 10_000, required=True)
            self.ranged(where, props, "MaximumBatchingWindowInSeconds", 0, 300, required=False)
            self.ranged(where, props, "ParallelizationFactor", 1, 10, required=False)

            types = props.get("FunctionResponseTypes") or []
            self.report.check(
                isinstance(types, list) and "ReportBatchItemFailures" in types,
                "esm.FunctionResponseTypes",
                where,
                f"must contain ReportBatchItemFailures, is {types!r}",
            )

            destination = (props.get("DestinationConfig") or {}).get("OnFailure", {}).get("Destination")
            target = ref_target(destination)
            target_type = self.resources.get(target or "", {}).get("Type")
            if self.report.check(
                destination is not None,
                "esm.DestinationConfig.OnFailure",
                where,
                "no on-failure destination: Lambda would drop batches it gives up on without a trace",
            ):
                self.report.check(
                    target_type == "AWS::SQS::Queue",
                    "esm.DestinationConfig.OnFailure",
                    where,
                    f"destination {text_of(destination)} is not an SQS queue of this template",
                )
                own_dlq = queue_urls.get(function_id)
                self.report.check(
                    target is None or target != own_dlq,
                    "esm.DestinationConfig.OnFailure",
                    where,
                    f"on-failure destination is {target}, the queue our crate dead-letters payloads to "
                    "(DEAD_LETTER_QUEUE_URL); Lambda's metadata-only records need a queue of their own",
                )

            positions = self.resolver.candidates(props.get("StartingPosition"))
            for origin, value in positions:
                self.report.check(
                    value in VALID_STARTING_POSITIONS,
                    "esm.StartingPosition",
                    where,
                    f"StartingPosition = {value!r} ({origin}); must be one of {', '.join(VALID_STARTING_POSITIONS)}",
                )
            if any(value == "AT_TIMESTAMP" for _, value in positions):
                self.report.check(
                    "StartingPositionTimestamp" in props,
                    "esm.StartingPositionTimestamp",
                    where,
                    "StartingPosition can be AT_TIMESTAMP but StartingPositionTimestamp is never set",
                )

            windowed = binary in WINDOWED_BINARIES
            self.ranged(where, props, "TumblingWindowInSeconds", 1 if windowed else 0, 900, required=windowed)

        for binary in STREAM_BINARIES:
            self.report.check(
                mapped_binaries.get(binary, 0) == 1,
                "esm.present",
                self.name,
                f"the {binary} function must have exactly one event source mapping, has {mapped_binaries.get(binary, 0)}",
            )

    def dead_letter_queues(self) -> dict[str, str | None]:
        """Function logical id -> logical id of the queue in its DEAD_LETTER_QUEUE_URL."""
        result = {}
        for lid, props in self.resources_of("AWS::Lambda::Function"):
            env = (props.get("Environment") or {}).get("Variables") or {}
            result[lid] = ref_target(env.get("DEAD_LETTER_QUEUE_URL"))
        return result

    # -------------------------------------------------------------- IAM

    def statements(self) -> Iterator[tuple[str, str, dict]]:
        for lid, res in self.resources.items():
            props = res.get("Properties", {})
            kind = res.get("Type")
            if kind == "AWS::IAM::Role":
                for policy in props.get("Policies") or []:
                    name = text_of(policy.get("PolicyName"))
                    for st in as_list((policy.get("PolicyDocument") or {}).get("Statement")):
                        yield lid, name, st
            elif kind in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy", "AWS::IAM::RolePolicy"):
                for st in as_list((props.get("PolicyDocument") or {}).get("Statement")):
                    yield lid, text_of(props.get("PolicyName", lid)), st

    @staticmethod
    def broad_resource(resource: Any) -> bool:
        text = text_of(resource)
        if text.strip() == "*":
            return True
        # ${AWS::Region} and friends contain colons; they are not part of the ARN's structure.
        parts = re.sub(r"\$\{[^}]*\}", "X", text).split(":", 5)
        if len(parts) == 6 and parts[0] == "arn":
            # The resource part names nothing in particular: "*", "table/*", "stream/*", "*/*".
            return re.fullmatch(r"[A-Za-z0-9_-]*/?\*(/\*)?", parts[5]) is not None
        return False

    def check_iam(self) -> None:
        for lid, policy, st in self.statements():
            if st.get("Effect") != "Allow":
                continue
            sid = st.get("Sid", "(no Sid)")
            where = f"{self.where(lid)} policy {policy} statement {sid}"
            actions = [text_of(a) for a in as_list(st.get("Action"))]
            data_plane = [
                a for a in actions if any(fnmatch.fnmatchcase(c.lower(), a.lower()) for c in DATA_PLANE_ACTIONS)
            ]
            if "NotAction" in st:
                self.report.check(False, "iam.NotAction", where, "Allow with NotAction grants almost everything")
                continue
            if "NotResource" in st and data_plane:
                self.report.check(False, "iam.NotResource", where, f"{data_plane} with NotResource")
                continue
            broad = [text_of(r) for r in as_list(st.get("Resource")) if self.broad_resource(r)]
            self.report.check(
                not (data_plane and broad),
                "iam.wildcard-resource",
                where,
                f"data-plane actions {data_plane} on {broad}: scope them to this stack's resources",
            )
        for lid, props in self.resources_of("AWS::IAM::Role"):
            for arn in as_list(props.get("ManagedPolicyArns")):
                text = text_of(arn)
                self.report.check(
                    BROAD_MANAGED_POLICY.search(text) is None,
                    "iam.managed-policy",
                    self.where(lid),
                    f"managed policy {text} grants data-plane actions on every resource "
                    "(for a Kinesis event SAM attaches AWSLambdaKinesisExecutionRole unless the function has its own Role)",
                )

    # -------------------------------------------------------------- function contract

    def check_function_contract(self) -> None:
        functions = self.functions()
        present = set(functions.values())
        for binary in FUNCTION_ENV:
            self.report.check(binary in present, "function.present", self.name, f"no function builds binary {binary}")
        for lid, binary in functions.items():
            props = self.resources[lid].get("Properties", {})
            where = self.where(lid)
            self.report.check(props.get("Runtime") == "provided.al2023", "function.runtime", where,
                              f"Runtime must be provided.al2023, is {props.get('Runtime')!r}")
            self.report.check(props.get("Handler") == "bootstrap", "function.handler", where,
                              f"Handler must be bootstrap, is {props.get('Handler')!r}")
            for arch in as_list(props.get("Architectures")):
                for origin, value in self.resolver.candidates(arch):
                    self.report.check(value in ("arm64", "x86_64"), "function.architecture", where,
                                      f"architecture {value!r} ({origin})")
            env = (props.get("Environment") or {}).get("Variables") or {}
            for name in COMMON_ENV + FUNCTION_ENV.get(binary, ()):
                self.report.check(name in env, "function.env", where,
                                  f"{binary} reads {name}, which is not set")
            for name, (pk, sk, ttl) in TABLE_KEYS.items():
                if name in env:
                    self.check_table(where, name, ref_target(env[name]), pk, sk, ttl)
            log_group = ref_target((props.get("LoggingConfig") or {}).get("LogGroup"))
            retention = self.resources.get(log_group or "", {}).get("Properties", {}).get("RetentionInDays")
            self.report.check(retention is not None, "function.log-retention", where,
                              "needs LoggingConfig.LogGroup pointing at a log group of this template with RetentionInDays")

    def check_table(self, where: str, env_name: str, table_id: str | None, pk: str, sk: str | None, ttl: str | None):
        table = self.resources.get(table_id or "", {})
        rule = "function.table"
        if not self.report.check(table.get("Type") == "AWS::DynamoDB::Table", rule, where,
                                 f"{env_name} must reference a DynamoDB table of this template"):
            return
        props = table.get("Properties", {})
        keys = {k.get("KeyType"): k.get("AttributeName") for k in props.get("KeySchema", [])}
        types = {a.get("AttributeName"): a.get("AttributeType") for a in props.get("AttributeDefinitions", [])}
        self.report.check(keys.get("HASH") == pk and types.get(pk) == "S", rule, f"{where} -> {table_id}",
                          f"{env_name}: partition key must be {pk} (S), is {keys.get('HASH')!r}")
        self.report.check(keys.get("RANGE") == sk and (sk is None or types.get(sk) == "S"), rule,
                          f"{where} -> {table_id}", f"{env_name}: sort key must be {sk!r}, is {keys.get('RANGE')!r}")
        if ttl:
            spec = props.get("TimeToLiveSpecification") or {}
            self.report.check(spec.get("AttributeName") == ttl and as_bool(spec.get("Enabled")) is True, rule,
                              f"{where} -> {table_id}", f"{env_name}: TTL must be enabled on {ttl}")

    # -------------------------------------------------------------- alarms and dashboard

    def alarm_metrics(self) -> dict[tuple[str, str, str], list[str]]:
        """(namespace, metric, first dimension value) -> alarms watching it."""
        watched: dict[tuple[str, str, str], list[str]] = {}

        def add(alarm: str, namespace: Any, metric: Any, dims: Any) -> None:
            ns = ref_target(namespace) or text_of(namespace)
            for dim in as_list(dims) or [{}]:
                value = dim.get("Value")
                key = (ns, text_of(metric), ref_target(value) or text_of(value if value is not None else ""))
                watched.setdefault(key, []).append(alarm)

        for lid, props in self.resources_of("AWS::CloudWatch::Alarm"):
            if "MetricName" in props:
                add(lid, props.get("Namespace"), props["MetricName"], props.get("Dimensions"))
            for query in props.get("Metrics") or []:
                metric = (query.get("MetricStat") or {}).get("Metric")
                if metric:
                    add(lid, metric.get("Namespace"), metric.get("MetricName"), metric.get("Dimensions"))
        return watched

    def check_alarms(self) -> None:
        watched = self.alarm_metrics()
        functions = self.functions()
        by_binary = {binary: lid for lid, binary in functions.items()}
        wanted: list[tuple[tuple[str, str, str], str]] = []
        for binary in STREAM_BINARIES:
            if binary in by_binary:
                wanted.append((("AWS/Lambda", "IteratorAge", by_binary[binary]), f"iterator age of {binary}"))
        for binary, lid in by_binary.items():
            wanted.append((("AWS/Lambda", "Errors", lid), f"errors of {binary}"))
            wanted.append((("AWS/Lambda", "Invocations", lid), f"error rate (invocations) of {binary}"))
            wanted.append((("AWS/Lambda", "Throttles", lid), f"throttles of {binary}"))
        streams = [lid for lid, _ in self.resources_of("AWS::Kinesis::Stream")]
        for stream in streams:
            for metric in ("ReadProvisionedThroughputExceeded", "WriteProvisionedThroughputExceeded"):
                wanted.append((("AWS/Kinesis", metric, stream), f"{metric} of {stream}"))
        dlqs = {q for q in self.dead_letter_queues().values() if q}
        on_failure = {
            ref_target((p.get("DestinationConfig") or {}).get("OnFailure", {}).get("Destination"))
            for _, p in self.resources_of("AWS::Lambda::EventSourceMapping")
        } - {None}
        for queue in sorted(dlqs | on_failure):
            wanted.append((("AWS/SQS", "ApproximateNumberOfMessagesVisible", queue), f"depth of {queue}"))
        namespace = "MetricsNamespace" if "MetricsNamespace" in self.resolver.parameters else "Shardwise"
        for consumer in CANARY_CONSUMERS:
            wanted.append(((namespace, "CanaryMissing", consumer), f"CanaryMissing for {consumer}"))
        for key, what in wanted:
            self.report.check(key in watched, "alarm.present", self.name, f"no alarm watches {what} {key}")

        for key, alarms in watched.items():
            if key[:2] != ("AWS/Lambda", "IteratorAge"):
                continue
            for alarm in alarms:
                props = self.resources[alarm]["Properties"]
                # Our deployments alarm at 30 s; a user may choose a looser threshold on purpose.
                for origin, value in self.resolver.candidates(props.get("Threshold"), bounds=False):
                    number = as_int(value)
                    self.report.check(
                        number is not None and number <= ITERATOR_AGE_MAX_THRESHOLD_MS,
                        "alarm.iterator-age-threshold",
                        self.where(alarm),
                        f"Threshold {value!r} ({origin}) must be at most {ITERATOR_AGE_MAX_THRESHOLD_MS} ms",
                    )

    def check_dashboard(self) -> None:
        dashboards = list(self.resources_of("AWS::CloudWatch::Dashboard"))
        if not self.report.check(bool(dashboards), "dashboard.present", self.name, "no CloudWatch dashboard"):
            return
        for lid, props in dashboards:
            body = text_of(props.get("DashboardBody"))
            # ${Name} and ${Name.Attr} become strings; then the body must be valid JSON.
            rendered = re.sub(r"\$\{[^}!]+\}", "x", body)
            try:
                parsed = json.loads(rendered)
            except json.JSONDecodeError as exc:
                self.report.check(False, "dashboard.json", self.where(lid), f"DashboardBody is not JSON: {exc}")
                continue
            self.report.check(bool(parsed.get("widgets")), "dashboard.json", self.where(lid), "no widgets")
            for metric in EMF_METRICS:
                self.report.check(f'"{metric}"' in body, "dashboard.emf", self.where(lid),
                                  f"EMF metric {metric} is not on the dashboard")


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--template", type=Path, default=ROOT / "template.yaml")
    parser.add_argument("--samconfig", type=Path, default=ROOT / "samconfig.toml",
                        help="parameter_overrides of every config env are checked too")
    parser.add_argument("--region", default=os.environ.get("AWS_REGION") or "us-east-1")
    parser.add_argument("--output", type=Path,
                        help="where to write the transformed template (default .aws-sam/check-template/)")
    parser.add_argument("--skip-cfn-lint", action="store_true")
    parser.add_argument("--skip-assertions", action="store_true")
    args = parser.parse_args(list(argv) if argv is not None else None)

    source, decoded = load_template(args.template)
    translated = translate(source, args.region)
    report = Report()

    # Kept after the run (.aws-sam/ is git-ignored) so findings can be read in context.
    out = args.output or ROOT / ".aws-sam" / "check-template" / f"{args.template.stem}.translated.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(translated, indent=1))
    if not args.skip_cfn_lint:
        run_cfn_lint(out, args.region, report)

    if not args.skip_assertions:
        overrides = samconfig_overrides(args.samconfig)
        Checker(source, decoded, translated, overrides, report, args.template.name).run()

    for failure in report.failures:
        print(failure)
    print(f"check_template: {report.passed} passed, {len(report.failures)} failed")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
