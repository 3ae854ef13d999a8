//! What it costs a worker to put an action's inputs in place, by method.
//!
//! The worker keeps one file per input digest in its file cache and gives each action
//! its inputs from there (`exec/src/worker/file_cache.rs`). This measures the ways of doing
//! that on the filesystem of `--dir`, with the page cache warm as it is for inputs
//! that consecutive actions share:
//!
//! - `hardlink`: `link(2)`, one shared inode (what the worker did before; an action
//!   that writes its input changes everyone's);
//! - `copy`: open, create, `copy_file_range` (through `std::io::copy`);
//! - `reflink`: create, `ioctl(FICLONE)`; only btrfs and XFS with reflinks;
//!   printed as unsupported elsewhere;
//! - `verify_then_hardlink`: SHA-256 of the cached file, then `link(2)`: the cheapest
//!   way to detect a changed entry before reusing it.
//!
//! Each round materializes every file of a set into a fresh directory (timed), then
//! removes the directory (timed separately: freeing copies is part of their cost).
//! Prints the median of `--rounds` as
//! `RESULT materialize.<set>.<method>=<ms> ms` and `..._cleanup=<ms> ms`.
//!
//! Usage: materialize-inputs [--dir DIR] [--rounds 7] [--small 1000] [--small-kib 4]
//!        [--large 4] [--large-mib 50]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use cairn_bench::{blob, result};
use sha2::Digest as _;

struct Args {
    dir: PathBuf,
    rounds: usize,
    small: usize,
    small_kib: usize,
    large: usize,
    large_mib: usize,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        dir: std::env::var_os("CAIRN_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir),
        rounds: 7,
        small: 1000,
        small_kib: 4,
        large: 4,
        large_mib: 50,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|error| format!("{flag} {value}: {error}"))
        };
        match flag.as_str() {
            "--dir" => args.dir = PathBuf::from(&value),
            "--rounds" => args.rounds = number()?.max(1),
            "--small" => args.small = number()?,
            "--small-kib" => args.small_kib = number()?,
            "--large" => args.large = number()?,
            "--large-mib" => args.large_mib = number()?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(args)
}

#[derive(Clone, Copy)]
enum Method {
    Hardlink,
    Copy,
    Reflink,
    VerifyThenHardlink,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Hardlink => "hardlink",
            Method::Copy => "copy",
            Method::Reflink => "reflink",
            Method::VerifyThenHardlink => "verify_then_hardlink",
        }
    }

    fn place(self, source: &Path, destination: &Path) -> std::io::Result<()> {
        match self {
            Method::Hardlink => std::fs::hard_link(source, destination),
            Method::Copy => {
                let mut from = File::open(source)?;
                let mut to = create(destination)?;
                std::io::copy(&mut from, &mut to).map(drop)
            }
            Method::Reflink => {
                let from = File::open(source)?;
                let to = create(destination)?;
                // SAFETY: FICLONE takes the source descriptor; both are open.
                if unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) } == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }
            Method::VerifyThenHardlink => {
                let mut from = File::open(source)?;
                let mut hasher = sha2::Sha256::new();
                let mut buffer = vec![0u8; 1 << 20];
                loop {
                    let read = from.read(&mut buffer)?;
                    if read == 0 {
                        break;
                    }
                    hasher.update(&buffer[..read]);
                }
                std::hint::black_box(hasher.finalize());
                std::fs::hard_link(source, destination)
            }
        }
    }
}

fn create(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn run(args: &Args) -> std::io::Result<()> {
    let scratch = tempfile::tempdir_in(&args.dir)?;
    let cache = scratch.path().join("cache");
    std::fs::create_dir(&cache)?;
    let mut sets: Vec<(String, Vec<PathBuf>)> = Vec::new();
    for (label, count, size, seed) in [
        (
            format!("{}x{}KiB", args.small, args.small_kib),
            args.small,
            args.small_kib << 10,
            0u64,
        ),
        (
            format!("{}x{}MiB", args.large, args.large_mib),
            args.large,
            args.large_mib << 20,
            1 << 32,
        ),
    ] {
        let mut files = Vec::new();
        for index in 0..count {
            let path = cache.join(format!("{label}-{index}"));
            let mut file = create(&path)?;
            file.write_all(&blob(seed + index as u64, size))?;
            files.push(path);
        }
        sets.push((label, files));
    }
    // Warm the page cache, as for inputs consecutive actions share.
    for (_, files) in &sets {
        for path in files {
            std::hint::black_box(std::fs::read(path)?);
        }
    }
    for (label, files) in &sets {
        for method in [
            Method::Hardlink,
            Method::Copy,
            Method::Reflink,
            Method::VerifyThenHardlink,
        ] {
            let mut placing = Vec::new();
            let mut cleaning = Vec::new();
            let mut unsupported = None;
            for round in 0..args.rounds {
                let action = scratch.path().join(format!("action-{round}"));
                std::fs::create_dir(&action)?;
                let started = Instant::now();
                for (index, source) in files.iter().enumerate() {
                    if let Err(error) = method.place(source, &action.join(index.to_string())) {
                        unsupported = Some(error);
                        break;
                    }
                }
                placing.push(started.elapsed().as_secs_f64() * 1e3);
                let started = Instant::now();
                std::fs::remove_dir_all(&action)?;
                cleaning.push(started.elapsed().as_secs_f64() * 1e3);
                if unsupported.is_some() {
                    break;
                }
            }
            let name = format!("materialize.{label}.{}", method.name());
            match unsupported {
                Some(error) => println!("RESULT {name}=unsupported ({error})"),
                None => {
                    result(&name, median(placing), "ms");
                    result(&format!("{name}_cleanup"), median(cleaning), "ms");
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("materialize-inputs: {message}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("materialize-inputs: {error}");
            ExitCode::FAILURE
        }
    }
}
