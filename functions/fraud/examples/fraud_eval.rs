//! `make fraud-eval`: the fraud function measured on the labelled set (`fraud::eval`).
//!
//! `cargo run --release -p fraud --example fraud_eval -- [--seed N]... [--cards N] [--days N]
//! [--incidents N] [--plot DIR]` prints the table per seed, writes the score plot of each seed
//! to DIR (`fraud-scores-seed-N.svg`), and exits non-zero when a seed misses a target.

use std::process::ExitCode;

use fraud::eval::{EvalOptions, evaluate};

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("fraud-eval: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<bool> {
    let mut options = EvalOptions::default();
    let mut seeds = Vec::new();
    let mut plot_dir = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))
        };
        match arg.as_str() {
            "--seed" => seeds.push(value("--seed")?.parse()?),
            "--cards" => options.scenario.cards = value("--cards")?.parse()?,
            "--days" => options.scenario.days = value("--days")?.parse()?,
            "--incidents" => {
                options.scenario.incidents_per_pattern = value("--incidents")?.parse()?
            }
            "--shards" => options.shards = value("--shards")?.parse()?,
            "--plot" => plot_dir = Some(std::path::PathBuf::from(value("--plot")?)),
            other => anyhow::bail!(
                "unknown argument {other:?} (expected --seed, --cards, --days, --incidents, --shards, --plot)"
            ),
        }
    }
    if seeds.is_empty() {
        seeds.push(options.scenario.seed);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut all_met = true;
    for seed in seeds {
        options.scenario.seed = seed;
        let report = runtime.block_on(evaluate(&options))?;
        println!("{}", report.table());
        let misses = report.misses();
        if misses.is_empty() {
            println!(
                "targets met (recall ≥ 95 % per pattern, false positives ≤ 0.5 %, precision ≥ 90 %)\n"
            );
        } else {
            all_met = false;
            println!("targets MISSED: {}\n", misses.join("; "));
        }
        if let Some(dir) = &plot_dir {
            std::fs::create_dir_all(dir)?;
            let path = dir.join(format!("fraud-scores-seed-{seed}.svg"));
            std::fs::write(
                &path,
                report.score_plot_svg(options.rules.anomaly.threshold),
            )?;
            println!("score plot: {}\n", path.display());
        }
    }
    Ok(all_met)
}
