//! `cairn-bench`: a REAPI load generator with verification (see `bench/README.md`).
//!
//! ```text
//! cairn-bench --addr grpc://127.0.0.1:50051 --scenario bs-write --concurrency 8 --duration 10s
//! ```
//!
//! Exits non-zero if any read returned wrong bytes, any answer was wrong, or any call
//! failed.

use std::process::ExitCode;
use std::time::Duration;

use cairn_bench::loadgen::{self, scenarios, Budget, Options};
use clap::Parser;

/// Drives a REAPI cache with one scenario (or `all`) and reports ops/s, MB/s and
/// latency percentiles.
#[derive(Parser, Debug)]
#[command(name = "cairn-bench")]
struct Args {
    /// gRPC address of the node; `grpcs://` for TLS.
    #[arg(long, default_value = "grpc://127.0.0.1:50051")]
    addr: String,
    /// PEM CA certificates trusted for a `grpcs://` address.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// bs-write, bs-write-blake3, bs-read, batch-small, batch-read, find-missing, ac, bazel-like, or all (each in
    /// turn, each with the whole --duration or --ops).
    #[arg(long)]
    scenario: String,
    /// Operations in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// HTTP/2 connections the operations are spread over.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// How long each scenario runs, e.g. 10s, 500ms.
    #[arg(long, default_value = "10s", value_parser = parse_duration, conflicts_with = "ops")]
    duration: Duration,
    /// Run each scenario for this many operations instead of a duration.
    #[arg(long)]
    ops: Option<u64>,
    /// Size of the bs-write and bs-read blobs, e.g. 16MiB, 64KiB.
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    blob_size: usize,
    /// Seed of the data generators; the same seed sends the same bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = split_unit(text);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("not a duration: {text}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" | "" => value,
        "m" => value * 60.0,
        _ => return Err(format!("unknown unit in {text} (use ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_size(text: &str) -> Result<usize, String> {
    let (number, unit) = split_unit(text);
    let value: usize = number.parse().map_err(|_| format!("not a size: {text}"))?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1000,
        "mb" => 1_000_000,
        _ => return Err(format!("unknown unit in {text} (use KiB, MiB, GiB)")),
    };
    Ok(value * scale)
}

fn split_unit(text: &str) -> (&str, &str) {
    let at = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    text.split_at(at)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let options = Options {
        addr: args.addr,
        tls_ca: args.tls_ca,
        concurrency: args.concurrency,
        connections: args.connections,
        budget: match args.ops {
            Some(ops) => Budget::Ops(ops),
            None => Budget::Time(args.duration),
        },
        blob_size: args.blob_size,
        seed: args.seed,
    };
    let names: Vec<&str> = if args.scenario == "all" {
        scenarios::ALL.to_vec()
    } else {
        vec![args.scenario.as_str()]
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cairn-bench: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let channels = loadgen::connect(&options).await?;
        let mut failed = false;
        for name in names {
            for report in scenarios::run(name, &options, &channels).await? {
                if args.json {
                    println!("{}", report.json());
                } else {
                    println!("{}", report.line());
                }
                failed |= report.errors > 0 || report.verify_failures > 0;
            }
        }
        Ok::<bool, String>(failed)
    });
    match outcome {
        Ok(false) => ExitCode::SUCCESS,
        Ok(true) => {
            eprintln!("cairn-bench: errors or verification failures (see above)");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("cairn-bench: {error}");
            ExitCode::FAILURE
        }
    }
}
