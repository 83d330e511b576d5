//! `shardwise`: the local runner's command line. Parses, dispatches, maps errors to exit codes;
//! everything else is in the library.

use std::process::ExitCode;

use clap::Parser;
use shardwise_local::cli::{Cli, Command, prepare_run};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHARDWISE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args).await,
        Command::Put(args) => shardwise_local::tools::put(args).await,
        Command::Replay(args) => shardwise_local::tools::replay(args).await,
        Command::Loadgen(args) => shardwise_local::tools::loadgen(args).await,
        Command::Plan(args) => {
            print!("{}", shardwise_local::plan::plan(&args));
            Ok(())
        }
        Command::Demo(args) => shardwise_local::demo::demo(args).await,
        Command::Bench(args) => shardwise_local::bench::bench(args).await,
        Command::Inspect(args) => shardwise_local::demo::inspect(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shardwise: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: shardwise_local::cli::RunArgs) -> anyhow::Result<()> {
    let config = prepare_run(&args, args.view_mode()).await?;
    let report = shardwise_local::runner::run(config, None).await?;
    println!(
        "\n{}ran {:.1} s; checkpoints in {}",
        shardwise_local::view::summary(&report),
        report.elapsed.as_secs_f64(),
        args.stream.state_dir.join("runner.db").display()
    );
    Ok(())
}
