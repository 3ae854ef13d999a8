//! GetTree's breadth-first walk, resumable page by page.
//!
//! A client pages through a large tree with `page_size` and `page_token`. A token that
//! only held a position in the walk made every page walk again from the root to get
//! there: a chain 10,000 directories deep read with `page_size` 1 cost 50 million
//! directory reads. So a walk that ends a page is parked here (its queue of
//! directories still to visit, the set of those already queued so a diamond's shared
//! subtree is sent once, and its position), and the token names it: the next page
//! resumes it, and a whole tree costs one read per directory.
//!
//! Parked walks are bounded: at most [`MAX_PARKED_WALKS`] walks holding at most
//! [`MAX_PARKED_DIGESTS`] digests together (about 64 MB), each kept for at most
//! [`PARKED_FOR`]; the oldest goes first. The token also carries the position, so a
//! token whose walk is gone (expired, evicted, parked by another node behind a load
//! balancer, or by a node since restarted) still works: that page walks again from the
//! root to the position, as before, and parks its own walk for the pages after it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cairn_proto::reapi::Directory;
use cairn_storage::Digest;
use futures::future::join_all;
use prost::Message;

use crate::digests;
use crate::error::{Error, Result};
use crate::store::Store;

/// Most walks parked at once.
pub const MAX_PARKED_WALKS: usize = 256;

/// Most digests (queued or seen) held by parked walks together.
pub const MAX_PARKED_DIGESTS: usize = 1 << 20;

/// How long a parked walk waits for its next page.
pub const PARKED_FOR: Duration = Duration::from_secs(600);

/// Most directory fetches in flight during a walk.
const FETCH_WIDTH: usize = 64;

/// A walk of the tree under `root`, stopped between two directories.
struct Walk {
    root: Digest,
    /// Directories returned or skipped so far.
    position: usize,
    /// Directories to visit, in breadth-first order.
    queue: VecDeque<Digest>,
    /// Every directory ever queued.
    seen: HashSet<Digest>,
    /// Whether the root has been read (a missing root is an error, a missing
    /// subdirectory is left out, as REAPI allows).
    root_read: bool,
}

impl Walk {
    fn new(root: Digest) -> Walk {
        Walk {
            root,
            position: 0,
            queue: VecDeque::from([root]),
            seen: HashSet::from([root]),
            root_read: false,
        }
    }

    fn digests(&self) -> usize {
        self.queue.len() + self.seen.len()
    }
}

/// One page of a walk.
pub struct TreePage {
    pub directories: Vec<Directory>,
    /// The token of the next page; empty after the last.
    pub next_page_token: String,
}

/// The walks waiting for their next page, shared by every shard of the node.
#[derive(Default)]
pub struct TreeWalks {
    inner: Mutex<Parked>,
}

#[derive(Default)]
struct Parked {
    next_id: u64,
    walks: HashMap<u64, (Walk, Instant)>,
    /// Ids in the order they were parked; ids of walks already taken are skipped.
    order: VecDeque<u64>,
    digests: usize,
}

impl TreeWalks {
    /// The page of the tree under `root` that `token` names (the first page when it is
    /// empty), at most `take` directories.
    pub async fn page(
        &self,
        store: &Store,
        root: Digest,
        token: &str,
        take: usize,
    ) -> Result<TreePage> {
        let (position, id) = parse_token(token)?;
        let mut walk = id
            .and_then(|id| self.unpark(id))
            .filter(|walk| walk.root == root && walk.position == position)
            .unwrap_or_else(|| Walk::new(root));
        let directories = walk_page(store, &mut walk, position, take).await?;
        let next_page_token = if walk.queue.is_empty() {
            String::new()
        } else {
            let position = walk.position;
            match self.park(walk) {
                Some(id) => format!("{position}.{id:x}"),
                None => position.to_string(),
            }
        };
        Ok(TreePage {
            directories,
            next_page_token,
        })
    }

    fn unpark(&self, id: u64) -> Option<Walk> {
        let mut parked = self.inner.lock().ok()?;
        let (walk, _) = parked.walks.remove(&id)?;
        parked.digests -= walk.digests();
        Some(walk)
    }

    /// Parks `walk`, making room by dropping expired and then the oldest walks; `None`
    /// when the walk alone is larger than the bound (its next page walks again).
    fn park(&self, walk: Walk) -> Option<u64> {
        let size = walk.digests();
        if size > MAX_PARKED_DIGESTS {
            return None;
        }
        let mut parked = self.inner.lock().ok()?;
        let now = Instant::now();
        while let Some(&oldest) = parked.order.front() {
            let expired = parked
                .walks
                .get(&oldest)
                .is_none_or(|(_, at)| now.duration_since(*at) > PARKED_FOR);
            let full = parked.walks.len() >= MAX_PARKED_WALKS
                || parked.digests + size > MAX_PARKED_DIGESTS;
            if !expired && !full {
                break;
            }
            parked.order.pop_front();
            if let Some((dropped, _)) = parked.walks.remove(&oldest) {
                parked.digests -= dropped.digests();
            }
        }
        // Ids are random, not counted, so a client cannot resume another's walk by
        // guessing (the walk holds only digests the client named, but still).
        let mut id = rand_id(parked.next_id);
        while parked.walks.contains_key(&id) {
            parked.next_id = parked.next_id.wrapping_add(1);
            id = rand_id(parked.next_id);
        }
        parked.next_id = parked.next_id.wrapping_add(1);
        parked.digests += size;
        parked.order.push_back(id);
        parked.walks.insert(id, (walk, now));
        Some(id)
    }
}

/// A 64-bit id no client can predict: the counter mixed with a per-process random key.
fn rand_id(counter: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(counter);
    hasher.finish()
}

/// `{position}` or `{position}.{walk id in hex}`.
fn parse_token(token: &str) -> Result<(usize, Option<u64>)> {
    if token.is_empty() {
        return Ok((0, None));
    }
    let invalid = || {
        let shown: String = token.chars().take(64).collect();
        Error::invalid_argument(format!("invalid page_token `{shown}`"))
    };
    let (position, id) = match token.split_once('.') {
        Some((position, id)) => (
            position,
            Some(u64::from_str_radix(id, 16).map_err(|_| invalid())?),
        ),
        None => (token, None),
    };
    Ok((position.parse().map_err(|_| invalid())?, id))
}

/// Continues `walk` until it has returned `take` directories past position `skip`
/// (reading, not returning, those before it), or the tree ends.
async fn walk_page(
    store: &Store,
    walk: &mut Walk,
    skip: usize,
    take: usize,
) -> Result<Vec<Directory>> {
    let directory_limit = store.limits().max_batch_total_size;
    let mut directories = Vec::new();
    while !walk.queue.is_empty() {
        let width = walk.queue.len().min(FETCH_WIDTH);
        let level: Vec<Digest> = walk.queue.drain(..width).collect();
        let fetched = join_all(level.iter().map(|digest| async move {
            if digest.size > directory_limit {
                return Err(Error::invalid_argument(format!(
                    "directory {}/{} is too large to be a Directory message",
                    digest.hash_hex(),
                    digest.size
                )));
            }
            store.get_bytes(*digest).await
        }))
        .await;
        store.metrics().tree_directories_read(level.len() as u64);
        let mut results = level.into_iter().zip(fetched);
        while let Some((digest, data)) = results.next() {
            let data = match data {
                Ok(data) => data,
                Err(error) if !walk.root_read => return Err(error),
                Err(_) => continue,
            };
            if walk.position >= skip && directories.len() == take {
                // The page is full: what this level did not get to goes back to the
                // front of the queue, in order, for the next page (which reads this
                // directory again: one read a page, so the tree's cost stays linear;
                // a missing one was skipped above, so the last page is never empty).
                let rest: Vec<Digest> = std::iter::once(digest)
                    .chain(results.map(|(digest, _)| digest))
                    .collect();
                for digest in rest.into_iter().rev() {
                    walk.queue.push_front(digest);
                }
                return Ok(directories);
            }
            walk.root_read = true;
            let directory = Directory::decode(data).map_err(|error| {
                Error::invalid_argument(format!(
                    "blob {}/{} is not a Directory: {error}",
                    digest.hash_hex(),
                    digest.size
                ))
            })?;
            for child in &directory.directories {
                let child = digests::required(digest.function, child.digest.as_ref(), "child")?;
                if walk.seen.insert(child) {
                    walk.queue.push_back(child);
                }
            }
            if walk.position >= skip {
                directories.push(directory);
            }
            walk.position += 1;
        }
    }
    Ok(directories)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_carry_a_position_and_maybe_a_walk() {
        assert_eq!(parse_token("").unwrap(), (0, None));
        assert_eq!(parse_token("17").unwrap(), (17, None));
        assert_eq!(parse_token("17.ff").unwrap(), (17, Some(255)));
        for bad in ["x", "17.", "17.zz", ".ff", "-1", "1.2.3"] {
            assert!(parse_token(bad).is_err(), "{bad} accepted");
        }
        let long = "9".repeat(100_000);
        let message = parse_token(&long).unwrap_err().to_string();
        assert!(message.len() < 200, "the whole token echoed back");
    }
}
