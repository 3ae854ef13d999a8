//! Sequential large-blob throughput of the engine, for `scripts/fio-compare.sh`.
//!
//! Puts `--total-mib` MiB as distinct `--blob-mib` MiB blobs (streamed in 1 MiB
//! chunks, `--concurrency` uploads at a time), then reads every blob back (streamed,
//! each chunk CRC-checked by the engine), and prints
//! `RESULT engine_seq.write=... MiB/s` and `RESULT engine_seq.read=... MiB/s`.
//! Digests are computed before the clock starts; the engine's own hashing of each
//! upload is part of the measured put, as it is in production. That first hashing is
//! timed too and printed as `RESULT engine_seq.hash=... MiB/s`: one core's rate for
//! the digest function, the ceiling of a single verified upload.
//!
//! Usage: engine-seq --dir DIR [--total-mib 512] [--blob-mib 16] [--concurrency 1]
//!        [--digest sha256|blake3]

use cairn_bench::{blob, config, put_chunked, read_all, result, stamped, MIB};
use cairn_storage::{Digest, DigestFunction, Engine};
use futures::executor::block_on;
use futures::StreamExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

struct Args {
    dir: PathBuf,
    total_mib: usize,
    blob_mib: usize,
    concurrency: usize,
    function: DigestFunction,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        dir: PathBuf::new(),
        total_mib: 512,
        blob_mib: 16,
        concurrency: 1,
        function: DigestFunction::Sha256,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or(format!("{flag}: {value:?} is not a positive number"))
        };
        match flag.as_str() {
            "--dir" => args.dir = PathBuf::from(&value),
            "--total-mib" => args.total_mib = number()?,
            "--blob-mib" => args.blob_mib = number()?,
            "--concurrency" => args.concurrency = number()?,
            "--digest" => {
                args.function = match value.as_str() {
                    "sha256" => DigestFunction::Sha256,
                    "blake3" => DigestFunction::Blake3,
                    _ => return Err(format!("--digest: {value:?} is not sha256 or blake3")),
                }
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.dir.as_os_str().is_empty() {
        return Err("--dir is required".into());
    }
    Ok(args)
}

fn run(args: &Args) -> cairn_storage::Result<()> {
    let count = (args.total_mib / args.blob_mib).max(1);
    let mut cfg = config(&args.dir);
    // Room for every blob twice over: nothing is evicted during the run.
    cfg.max_size = cfg.max_size.max((count * args.blob_mib * MIB * 2) as u64);
    let engine = Engine::start(cfg)?;
    let base = blob(7, args.blob_mib * MIB);
    let contents: Vec<_> = (0..count as u64).map(|i| stamped(&base, i)).collect();
    let bytes = (count * args.blob_mib * MIB) as f64;
    let t = Instant::now();
    let blobs: Vec<_> = contents
        .into_iter()
        .map(|data| (Digest::of(args.function, &data), data))
        .collect();
    let hash = bytes / MIB as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    block_on(
        futures::stream::iter(blobs.iter())
            .map(|(d, data)| put_chunked(&engine, *d, data))
            .buffer_unordered(args.concurrency)
            .fold(Ok(()), |acc: cairn_storage::Result<()>, r| async move {
                acc.and(r)
            }),
    )?;
    let write = bytes / MIB as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    let read_bytes = block_on(
        futures::stream::iter(blobs.iter())
            .map(|(d, _)| read_all(&engine, *d))
            .buffer_unordered(args.concurrency)
            .fold(Ok(0u64), |acc: cairn_storage::Result<u64>, r| async move {
                Ok(acc? + r?)
            }),
    )?;
    let read = bytes / MIB as f64 / t.elapsed().as_secs_f64();
    block_on(engine.shutdown())?;
    if read_bytes as f64 != bytes {
        return Err(cairn_storage::Error::new(
            cairn_storage::ErrorKind::Internal,
            format!("read back {read_bytes} bytes of {bytes}"),
        ));
    }
    println!(
        "engine: {count} blobs of {} MiB, {} in flight, {:?}",
        args.blob_mib, args.concurrency, args.function
    );
    result("engine_seq.hash", hash, "MiB/s");
    result("engine_seq.write", write, "MiB/s");
    result("engine_seq.read", read, "MiB/s");
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("engine-seq: {e}\nusage: engine-seq --dir DIR [--total-mib 512] [--blob-mib 16] [--concurrency 1] [--digest sha256|blake3]");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("engine-seq: {e}");
            ExitCode::FAILURE
        }
    }
}
