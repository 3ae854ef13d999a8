//! Hit ratios of the memory tier's policy against LRU and FIFO on synthetic traces.
//!
//! Replays each trace through the engine's own `S3Fifo` (`cairn_storage::internals`,
//! the code the shards run), an LRU and a FIFO of the same capacity, filling on every
//! miss as the tier does, and prints one markdown table row per trace and size:
//!
//! ```text
//! cargo run --release -p cairn-bench --bin tier-sim [-- --requests 2000000]
//! ```
//!
//! Traces, over `--objects` distinct hot keys (unit sizes: ratios count requests):
//! - `zipf-0.8`, `zipf-1.0`: independent Zipf draws of skew 0.8 and 1.0;
//! - `zipf-1.0+scans`: the same Zipf stream, with a one-time sequential scan of as many
//!   fresh keys as there are hot ones after every `objects` requests (a clean build's
//!   outputs, a bulk download passing through);
//! - `zipf-0.8+churn`: 30% of requests for keys never seen again, mixed in at random.

use cairn_storage::internals::S3Fifo;
use clap::Parser;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

#[derive(Parser)]
struct Args {
    /// Requests per trace.
    #[arg(long, default_value_t = 2_000_000)]
    requests: u64,
    /// Distinct hot keys.
    #[arg(long, default_value_t = 100_000)]
    objects: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Draws ranks 0..n with probability proportional to 1 / (rank + 1)^skew.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: u64, skew: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n as usize);
        let mut total = 0.0;
        for rank in 0..n {
            total += 1.0 / ((rank + 1) as f64).powf(skew);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Zipf { cdf }
    }

    fn draw(&self, rng: &mut u64) -> u64 {
        let u = (splitmix(rng) >> 11) as f64 / (1u64 << 53) as f64;
        self.cdf.partition_point(|&c| c < u) as u64
    }
}

/// A key for rank or sequence number `n` of a namespace: uniformly spread, as digests.
fn key(namespace: u64, n: u64) -> u64 {
    let mut x = namespace.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ n;
    splitmix(&mut x)
}

fn trace(name: &str, args: &Args) -> Vec<u64> {
    let mut rng = args.seed;
    let skew = if name.starts_with("zipf-0.8") {
        0.8
    } else {
        1.0
    };
    let zipf = Zipf::new(args.objects, skew);
    let mut out = Vec::with_capacity(args.requests as usize);
    let mut fresh = 0u64;
    while (out.len() as u64) < args.requests {
        match name {
            "zipf-1.0+scans" if out.len() as u64 % (2 * args.objects) == args.objects => {
                for _ in 0..args.objects {
                    out.push(key(2, fresh));
                    fresh += 1;
                }
            }
            "zipf-0.8+churn" if splitmix(&mut rng) % 10 < 3 => {
                out.push(key(2, fresh));
                fresh += 1;
            }
            _ => out.push(key(1, zipf.draw(&mut rng))),
        }
    }
    out.truncate(args.requests as usize);
    out
}

trait Policy {
    /// Whether `k` was held; a miss fills it.
    fn access(&mut self, k: u64) -> bool;
}

struct S3(S3Fifo<u64, ()>);

impl Policy for S3 {
    fn access(&mut self, k: u64) -> bool {
        if self.0.get(&k).is_some() {
            return true;
        }
        self.0.insert(k, (), 1);
        false
    }
}

struct Lru {
    capacity: usize,
    tick: u64,
    last: HashMap<u64, u64>,
    order: BTreeMap<u64, u64>,
}

impl Policy for Lru {
    fn access(&mut self, k: u64) -> bool {
        self.tick += 1;
        let hit = match self.last.insert(k, self.tick) {
            Some(old) => {
                self.order.remove(&old);
                true
            }
            None => false,
        };
        self.order.insert(self.tick, k);
        if self.last.len() > self.capacity {
            if let Some((_, oldest)) = self.order.pop_first() {
                self.last.remove(&oldest);
            }
        }
        hit
    }
}

struct Fifo {
    capacity: usize,
    held: HashSet<u64>,
    order: VecDeque<u64>,
}

impl Policy for Fifo {
    fn access(&mut self, k: u64) -> bool {
        if self.held.contains(&k) {
            return true;
        }
        self.held.insert(k);
        self.order.push_back(k);
        if self.held.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.held.remove(&oldest);
            }
        }
        false
    }
}

fn ratio(policy: &mut dyn Policy, trace: &[u64]) -> f64 {
    let hits = trace.iter().filter(|&&k| policy.access(k)).count();
    hits as f64 / trace.len() as f64
}

fn main() {
    let args = Args::parse();
    println!(
        "{} requests per trace, {} hot keys; hit ratio (share of requests served)\n",
        args.requests, args.objects
    );
    println!("| trace | cache (share of hot keys) | S3-FIFO | LRU | FIFO |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for name in ["zipf-0.8", "zipf-1.0", "zipf-1.0+scans", "zipf-0.8+churn"] {
        let t = trace(name, &args);
        for share in [0.01, 0.05, 0.10, 0.25] {
            let capacity = ((args.objects as f64 * share) as usize).max(10);
            let s3 = ratio(&mut S3(S3Fifo::new(capacity as u64)), &t);
            let lru = ratio(
                &mut Lru {
                    capacity,
                    tick: 0,
                    last: HashMap::new(),
                    order: BTreeMap::new(),
                },
                &t,
            );
            let fifo = ratio(
                &mut Fifo {
                    capacity,
                    held: HashSet::new(),
                    order: VecDeque::new(),
                },
                &t,
            );
            println!(
                "| {name} | {:.0}% | {s3:.3} | {lru:.3} | {fifo:.3} |",
                share * 100.0
            );
        }
    }
}
