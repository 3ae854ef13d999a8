//! A child process writes under load and is SIGKILLed at a random point, twenty
//! times over the same data directory. After each kill the directory is reopened:
//! every blob the child saw acknowledged reads back intact, and a blob whose upload
//! was cut short is either absent or intact, never wrong.

mod common;

use cairn_storage::{Digest, EngineConfig, ErrorKind};
use common::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

const CHILD_ENV: &str = "CAIRN_CRASH_CHILD_DIR";
const KILLS: u64 = 20;

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

fn size_for(seed: u64) -> usize {
    match seed % 16 {
        0..=10 => 100 + (seed as usize * 7919) % 20_000,
        11..=14 => 70_000 + (seed as usize * 104_729) % 400_000,
        _ => 2_500_000 + (seed as usize) % 100_000,
    }
}

/// The writer: four concurrent upload loops, announcing each upload before it starts
/// ("begin SEED") and after it is acknowledged ("ack SEED").
#[test]
#[ignore = "run by crash_consistency_under_repeated_sigkill in a child process"]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let first: u64 = std::env::var("CAIRN_CRASH_FIRST_SEED")
        .unwrap()
        .parse()
        .unwrap();
    let engine = start(crash_config(Path::new(&dir)));
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
                    block_on(engine.put(d, data)).unwrap();
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
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked: Vec<u64> = Vec::new();
    let mut cut_short: Vec<u64> = Vec::new();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    for round in 0..KILLS {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let kill_after = 5 + rng % 120;
        let mut child = Command::new(&exe)
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
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut state: HashMap<u64, bool> = HashMap::new();
        let mut acks = 0;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(seed) = line.strip_prefix("begin ") {
                state.insert(seed.parse().unwrap(), false);
            } else if let Some(seed) = line.strip_prefix("ack ") {
                state.insert(seed.parse().unwrap(), true);
                acks += 1;
                if acks == kill_after {
                    // SAFETY: kill(2) on the child we spawned and have not reaped.
                    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                    break;
                }
            }
        }
        child.wait().unwrap();
        assert_eq!(acks, kill_after, "child exited before it was killed");
        for (seed, done) in state {
            if done {
                acked.push(seed)
            } else {
                cut_short.push(seed)
            }
        }

        let engine = start(crash_config(dir.path()));
        for &seed in &acked {
            let data = blob(seed, size_for(seed));
            let d = digest(&data);
            let got = block_on(engine.get_bytes(d))
                .unwrap_or_else(|e| panic!("round {round}: acknowledged blob {seed} lost: {e}"));
            assert!(
                got == data,
                "round {round}: acknowledged blob {seed} corrupted"
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
    }
    println!("{} acknowledged blobs survived {KILLS} kills", acked.len());
}
