//! `shardwise plan`: how many shards a workload needs, how much Lambda concurrency that implies,
//! and what it costs a month, with every step of the arithmetic printed.
//!
//! Limits (per shard, Kinesis Data Streams provisioned mode): 1 MiB/s or 1000 records/s in;
//! 2 MiB/s out, shared by all shared-throughput consumers — or 2 MiB/s *per consumer* with
//! enhanced fan-out, which is what we plan for when more than two consumers read the stream
//! (the third shared-throughput consumer would already exceed the shard's read budget at full
//! write rate). A Kinesis mapping runs one concurrent invocation per shard and
//! parallelization factor.

use std::fmt::Write as _;

use clap::Args;

/// Prices used: AWS's published list prices for us-east-1, as of the date below. They are
/// compiled into the tool (this machine has no network to fetch them): check the pricing pages
/// before budgeting.
pub mod prices {
    pub const AS_OF: &str = "2025-01 (us-east-1 list prices, Kinesis Data Streams provisioned mode and AWS Lambda pricing pages)";
    /// $ per shard-hour.
    pub const SHARD_HOUR: f64 = 0.015;
    /// $ per million PUT payload units (25 KB each).
    pub const PUT_UNITS_PER_MILLION: f64 = 0.014;
    /// $ per consumer-shard-hour of enhanced fan-out.
    pub const EFO_CONSUMER_SHARD_HOUR: f64 = 0.015;
    /// $ per GB retrieved through enhanced fan-out.
    pub const EFO_GB: f64 = 0.013;
    /// $ per GB-second of Lambda, arm64 (x86_64: 0.0000166667).
    pub const LAMBDA_GB_SECOND_ARM: f64 = 0.000_013_333_4;
    pub const LAMBDA_GB_SECOND_X86: f64 = 0.000_016_666_7;
    /// $ per million Lambda requests.
    pub const LAMBDA_REQUESTS_PER_MILLION: f64 = 0.20;
    /// Hours in AWS's pricing month.
    pub const HOURS_PER_MONTH: f64 = 730.0;
}

#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// Incoming data, MiB/s (0: derived from records/s × record size).
    #[arg(long, default_value_t = 0.0)]
    pub mb_per_sec: f64,
    /// Incoming records per second.
    #[arg(long)]
    pub records_per_sec: f64,
    /// Average record size, KiB.
    #[arg(long, default_value_t = 1.0)]
    pub avg_record_kb: f64,
    /// Consumers (Lambda functions) reading the stream.
    #[arg(long, default_value_t = 1)]
    pub consumers: u32,
    #[arg(long, default_value_t = 1)]
    pub parallelization_factor: u32,
    /// Records per invocation when batches fill.
    #[arg(long, default_value_t = 100)]
    pub batch_size: u32,
    /// Average invocation duration, ms.
    #[arg(long, default_value_t = 100.0)]
    pub avg_duration_ms: f64,
    #[arg(long, default_value_t = 512)]
    pub memory_mb: u32,
    /// Price x86_64 instead of arm64.
    #[arg(long)]
    pub x86: bool,
}

fn ceil(x: f64) -> u64 {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = x.ceil().max(0.0) as u64;
    n
}

/// The plan, as text.
pub fn plan(args: &PlanArgs) -> String {
    let mut o = String::new();
    let derived_mb = args.records_per_sec * args.avg_record_kb / 1024.0;
    let mb = args.mb_per_sec.max(derived_mb);
    let efo = args.consumers > 2;
    let _ = writeln!(
        o,
        "Workload: {:.2} MiB/s in ({} given, {:.2} from {} rec/s × {} KiB), {} rec/s, {} consumer(s)",
        mb,
        args.mb_per_sec,
        derived_mb,
        args.records_per_sec,
        args.avg_record_kb,
        args.records_per_sec,
        args.consumers
    );
    let _ = writeln!(
        o,
        "\nShards (per shard: 1 MiB/s and 1000 rec/s in; 2 MiB/s out shared, or per consumer with enhanced fan-out)"
    );
    let by_bytes = ceil(mb / 1.0);
    let by_records = ceil(args.records_per_sec / 1000.0);
    let read_mb = if efo {
        mb
    } else {
        mb * f64::from(args.consumers)
    };
    let by_reads = ceil(read_mb / 2.0);
    let _ = writeln!(
        o,
        "  write bytes:   ceil({mb:.2} MiB/s / 1 MiB/s)            = {by_bytes}"
    );
    let _ = writeln!(
        o,
        "  write records: ceil({} rec/s / 1000 rec/s)          = {by_records}",
        args.records_per_sec
    );
    if efo {
        let _ = writeln!(
            o,
            "  reads:         {} consumers > 2 → enhanced fan-out, 2 MiB/s per consumer per shard: ceil({mb:.2} / 2) = {by_reads}",
            args.consumers
        );
    } else {
        let _ = writeln!(
            o,
            "  reads:         shared 2 MiB/s: ceil({mb:.2} MiB/s × {} consumers / 2 MiB/s) = {by_reads}",
            args.consumers
        );
    }
    let shards = by_bytes.max(by_records).max(by_reads).max(1);
    let _ = writeln!(
        o,
        "  → shards = max({by_bytes}, {by_records}, {by_reads}) = {shards}"
    );

    let concurrency = shards * u64::from(args.parallelization_factor) * u64::from(args.consumers);
    let _ = writeln!(
        o,
        "\nLambda concurrency: {shards} shards × parallelization factor {} × {} consumers = {concurrency}",
        args.parallelization_factor, args.consumers
    );

    let seconds = prices::HOURS_PER_MONTH * 3600.0;
    let _ = writeln!(o, "\nMonthly cost (prices: {})", prices::AS_OF);
    let shard_cost = shards as f64 * prices::HOURS_PER_MONTH * prices::SHARD_HOUR;
    let _ = writeln!(
        o,
        "  shard hours:  {shards} × {} h × ${} = ${shard_cost:.2}",
        prices::HOURS_PER_MONTH,
        prices::SHARD_HOUR
    );
    let units_per_record = ceil(args.avg_record_kb / 25.0).max(1);
    let units = args.records_per_sec * units_per_record as f64 * seconds / 1e6;
    let put_cost = units * prices::PUT_UNITS_PER_MILLION;
    let _ = writeln!(
        o,
        "  PUT units:    {} rec/s × {units_per_record} unit(s) × {seconds:.0} s = {units:.1} M × ${} = ${put_cost:.2}",
        args.records_per_sec,
        prices::PUT_UNITS_PER_MILLION
    );
    let mut total = shard_cost + put_cost;
    if efo {
        let hours = f64::from(args.consumers) * shards as f64 * prices::HOURS_PER_MONTH;
        let hour_cost = hours * prices::EFO_CONSUMER_SHARD_HOUR;
        let gb = mb * seconds / 1024.0 * f64::from(args.consumers);
        let gb_cost = gb * prices::EFO_GB;
        let _ = writeln!(
            o,
            "  fan-out:      {} consumers × {shards} shards × {} h × ${} = ${hour_cost:.2}",
            args.consumers,
            prices::HOURS_PER_MONTH,
            prices::EFO_CONSUMER_SHARD_HOUR
        );
        let _ = writeln!(
            o,
            "  fan-out data: {mb:.2} MiB/s × {seconds:.0} s / 1024 × {} consumers = {gb:.0} GB × ${} = ${gb_cost:.2}",
            args.consumers,
            prices::EFO_GB
        );
        total += hour_cost + gb_cost;
    }
    let per_consumer_rate =
        (args.records_per_sec / f64::from(args.batch_size.max(1))).max(shards as f64 * 0.0);
    let invocations = per_consumer_rate * seconds * f64::from(args.consumers);
    let request_cost = invocations / 1e6 * prices::LAMBDA_REQUESTS_PER_MILLION;
    let _ = writeln!(
        o,
        "  invocations:  {} rec/s / batch {} × {seconds:.0} s × {} consumers = {:.1} M × ${} = ${request_cost:.2}",
        args.records_per_sec,
        args.batch_size,
        args.consumers,
        invocations / 1e6,
        prices::LAMBDA_REQUESTS_PER_MILLION
    );
    let gb_seconds =
        invocations * args.avg_duration_ms / 1000.0 * f64::from(args.memory_mb) / 1024.0;
    let rate = if args.x86 {
        prices::LAMBDA_GB_SECOND_X86
    } else {
        prices::LAMBDA_GB_SECOND_ARM
    };
    let compute_cost = gb_seconds * rate;
    let _ = writeln!(
        o,
        "  compute:      {:.1} M inv × {} ms × {} MB / 1024 = {gb_seconds:.0} GB-s × ${rate} ({}) = ${compute_cost:.2}",
        invocations / 1e6,
        args.avg_duration_ms,
        args.memory_mb,
        if args.x86 { "x86_64" } else { "arm64" }
    );
    total += request_cost + compute_cost;
    let _ = writeln!(
        o,
        "  → total ≈ ${total:.2} / month (before free tier, data transfer, CloudWatch, DynamoDB, SQS)"
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_example_needs_ten_shards_and_fan_out() {
        let text = plan(&PlanArgs {
            mb_per_sec: 10.0,
            records_per_sec: 8000.0,
            avg_record_kb: 1.0,
            consumers: 3,
            parallelization_factor: 1,
            batch_size: 100,
            avg_duration_ms: 100.0,
            memory_mb: 512,
            x86: false,
        });
        assert!(text.contains("→ shards = max(10, 8, 5) = 10"), "{text}");
        assert!(text.contains("enhanced fan-out"), "{text}");
        assert!(text.contains("= 30"), "{text}");
    }
}
