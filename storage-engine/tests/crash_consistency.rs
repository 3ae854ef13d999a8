//! A child process writes under load and is SIGKILLed at a random point, over and
//! over on the same data directory. After each kill the directory is reopened: every
//! blob the child saw acknowledged reads back intact, and a blob whose upload was cut
//! short is either absent or intact, never wrong. A second run does the same with a
//! budget so small that every round evicts (and checkpoints land mid-eviction): there
//! an acknowledged blob may be gone, but never wrong, the newest survive, and the
//! directory stays within its budget.

mod common;

use cairn_storage::{Digest, EngineConfig, ErrorKind};
use common::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const CHILD_ENV: &str = "CAIRN_CRASH_CHILD_DIR";
/// Set in the child for the small-budget run.
const EVICTING_ENV: &str = "CAIRN_CRASH_EVICTING";
const KILLS: u64 = 20;
/// Budget of the evicting run: 4 partitions of four 1 MiB segments.
const SMALL_BUDGET: u64 = 16 * MIB;

fn crash_config(dir: &Path) -> EngineConfig {
    EngineConfig {
        max_size: 1024 * MIB,
        partitions: 4,
        segment_size: Some(8 * MIB),
        small_blob_max: 64 << 10,
        max_ac_value: 64 << 10,
        // Checkpoints happen while blobs are being written, so recovery exercises
        // checkpoint + replay as well as the scan.
        checkpoint_interval: Some(std::time::Duration::from_millis(30)),
        sync_interval: Some(std::time::Duration::from_millis(10)),
        ..config(dir)
    }
}

fn evicting_config(dir: &Path) -> EngineConfig {
    EngineConfig {
        max_size: SMALL_BUDGET,
        segment_size: Some(MIB),
        ..crash_config(dir)
    }
}

fn size_for(seed: u64) -> usize {
    match seed % 16 {
        0..=10 => 100 + (seed as usize * 7919) % 20_000,
        11..=14 => 70_000 + (seed as usize * 104_729) % 400_000,
        _ => 2_500_000 + (seed as usize) % 100_000,
    }
}

/// Sizes of the evicting run: small records, extents and huge segments, small enough
/// that a few uploads in flight fit a 4 MiB partition beside its two open segments;
/// about 110 KB on average.
fn evicting_size_for(seed: u64) -> usize {
    match seed % 16 {
        0..=10 => 100 + (seed as usize * 7919) % 60_000,
        11..=14 => 70_000 + (seed as usize * 104_729) % 200_000,
        _ => 300_000 + (seed as usize) % 400_000,
    }
}

/// The config and blob sizes of a run.
struct Mode {
    config: fn(&Path) -> EngineConfig,
    size_for: fn(u64) -> usize,
}

fn mode(evicting: bool) -> Mode {
    if evicting {
        Mode {
            config: evicting_config,
            size_for: evicting_size_for,
        }
    } else {
        Mode {
            config: crash_config,
            size_for,
        }
    }
}

/// The writer: four concurrent upload loops, announcing each upload before it starts
/// ("begin SEED") and after it is acknowledged ("ack SEED").
#[test]
#[ignore = "run by the crash_consistency_* tests in a child process"]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let first: u64 = std::env::var("CAIRN_CRASH_FIRST_SEED")
        .unwrap()
        .parse()
        .unwrap();
    let evicting = std::env::var_os(EVICTING_ENV).is_some();
    let Mode { config, size_for } = mode(evicting);
    let engine = start(config(Path::new(&dir)));
    let out = std::sync::Mutex::new(std::io::stdout());
    std::thread::scope(|s| {
        for lane in 0..4u64 {
            let engine = engine.clone();
            let out = &out;
            s.spawn(move || {
                for n in 0..100_000u64 {
                    let seed = first + n * 4 + lane;
                    let data = blob(seed, size_for(seed));
                    let d = digest(&data);
                    writeln!(out.lock().unwrap(), "begin {seed}").unwrap();
                    match block_on(engine.put(d, data)) {
                        Ok(()) => {}
                        // Under a tiny budget an upload may be refused (no room beside
                        // the uploads in flight, its segment reclaimed): never
                        // acknowledged, so only checked to be absent or intact.
                        Err(_) if evicting => continue,
                        Err(e) => panic!("put {seed}: {e}"),
                    }
                    let mut o = out.lock().unwrap();
                    writeln!(o, "ack {seed}").unwrap();
                    o.flush().unwrap();
                }
            });
        }
    });
}

#[test]
fn crash_consistency_under_repeated_sigkill() {
    sigkill_rounds(false);
}

/// Every round evicts; an acknowledged blob may be gone, the newest may not.
#[test]
fn crash_consistency_when_every_round_evicts() {
    sigkill_rounds(true);
}

/// The segment ids in each partition directory of `dir`, lowest first.
fn segment_ids(dir: &Path) -> Vec<(PathBuf, u32)> {
    segment_files(dir)
        .into_iter()
        .filter_map(|f| {
            let stem = f.file_stem()?.to_str()?;
            Some((
                f.parent()?.to_path_buf(),
                u32::from_str_radix(stem, 16).ok()?,
            ))
        })
        .collect()
}

/// The lowest segment id of every partition.
fn oldest_segments(dir: &Path) -> HashMap<PathBuf, u32> {
    let mut oldest = HashMap::new();
    for (part, id) in segment_ids(dir) {
        let e = oldest.entry(part).or_insert(id);
        *e = (*e).min(id);
    }
    oldest
}

fn sigkill_rounds(evicting: bool) {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let Mode { config, size_for } = mode(evicting);
    // Each evicting round writes about 40 MB: fewer rounds keep the test's time close
    // to the other run's.
    let kills = if evicting { 10 } else { KILLS };
    let mut acked: Vec<u64> = Vec::new();
    let mut cut_short: Vec<u64> = Vec::new();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut oldest_before = oldest_segments(dir.path());
    for round in 0..kills {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // The evicting run writes at least twice its budget per round (about 110 KB a
        // blob), so every round reclaims segments in every partition.
        let kill_after = if evicting {
            300 + rng % 200
        } else {
            5 + rng % 120
        };
        let mut child = Command::new(&exe);
        child
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .env("CAIRN_CRASH_FIRST_SEED", (round * 10_000_000).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if evicting {
            child.env(EVICTING_ENV, "1");
        }
        let mut child = child.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut state: HashMap<u64, bool> = HashMap::new();
        let mut acks = 0;
        let mut killed = false;
        let mut last_acked = None;
        // The pipe holds what the child printed before the kill took effect, up to
        // thousands of lines, so it is read to the end: the newest acknowledged blob
        // is the last ack the child printed, not the one that triggered the kill
        // (under eviction, the megabytes written between the two can evict that one).
        // A line cut short by the kill does not parse and is ignored.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(Ok(seed)) = line.strip_prefix("begin ").map(str::parse) {
                state.insert(seed, false);
            } else if let Some(Ok(seed)) = line.strip_prefix("ack ").map(str::parse) {
                state.insert(seed, true);
                last_acked = Some(seed);
                acks += 1;
                if acks == kill_after {
                    // SAFETY: kill(2) on the child we spawned and have not reaped.
                    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                    killed = true;
                }
            }
        }
        child.wait().unwrap();
        assert!(killed, "child exited before it was killed");
        for (seed, done) in state {
            if done {
                acked.push(seed)
            } else {
                cut_short.push(seed)
            }
        }

        if evicting {
            let oldest = oldest_segments(dir.path());
            for (part, id) in &oldest {
                let before = oldest_before.get(part).copied().unwrap_or(0);
                assert!(
                    *id > before,
                    "round {round}: {} reclaimed nothing (oldest segment {id})",
                    part.display()
                );
            }
            oldest_before = oldest;
            assert!(
                disk_usage(dir.path()) <= SMALL_BUDGET,
                "round {round}: over budget"
            );
        }
        let engine = start(config(dir.path()));
        for &seed in &acked {
            let data = blob(seed, size_for(seed));
            let d = digest(&data);
            match block_on(engine.get_bytes(d)) {
                Ok(got) => assert!(
                    got == data,
                    "round {round}: acknowledged blob {seed} corrupted"
                ),
                Err(e) if evicting && e.kind() == ErrorKind::NotFound => {}
                Err(e) => panic!("round {round}: acknowledged blob {seed} lost: {e}"),
            }
        }
        if let Some(seed) = last_acked {
            let data = blob(seed, size_for(seed));
            assert!(
                block_on(engine.get_bytes(digest(&data))).ok() == Some(data),
                "round {round}: the newest acknowledged blob {seed} is gone"
            );
        }
        for &seed in &cut_short {
            let d: Digest = digest(&blob(seed, size_for(seed)));
            match block_on(engine.get_bytes(d)) {
                Ok(got) => assert!(
                    digest(&got) == d,
                    "round {round}: blob {seed} has wrong bytes"
                ),
                Err(e) => assert_eq!(e.kind(), ErrorKind::NotFound, "round {round}: {e}"),
            }
        }
        assert_eq!(block_on(engine.stats()).unwrap().crc_failures(), 0);
        block_on(engine.shutdown()).unwrap();
        if evicting {
            oldest_before = oldest_segments(dir.path());
        }
    }
    println!(
        "{} acknowledged blobs checked over {kills} kills",
        acked.len()
    );
}
