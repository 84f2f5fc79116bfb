//! Host uid ranges handed to guests: each netns guest's user namespace maps its ids
//! 0–65535 onto a range of its own, and each VM's QEMU runs as the first uid of one, so
//! no two guests share a uid on the host (a guest cannot signal or trace another's
//! processes). Ranges lie in systemd's container range (0x80000–0x6fffffff).
//!
//! A range is recorded in `/run/violin/uids/KEY` as "FIRST-UID OWNER-PATH"; the record
//! is live while the owner path exists (the guest's netns mount or VM directory), so
//! ranges of guests that vanished (a crash, `ip netns del`) are reclaimed.

use anyhow::{Context, Result};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

pub const DIR: &str = "/run/violin/uids";
/// Ids per guest.
pub const RANGE: u32 = 0x1_0000;
const FIRST: u32 = 0x8_0000;
const SLOTS: u32 = (0x7000_0000 - FIRST) / RANGE;

/// Runs `f` holding the allocation lock, which every daemon on the machine shares.
/// Make the owner path inside `f`, so no one sees a record without its owner.
pub fn locked<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    fs::create_dir_all(DIR).with_context(|| format!("creating {DIR}"))?;
    let lock = File::create(Path::new(DIR).join(".lock"))
        .with_context(|| format!("creating {DIR}/.lock"))?;
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking {DIR}/.lock"))?;
    f()
}

/// Picks a free range for `key`, owned by `owner`, and records it (call under
/// [`locked`]). The search starts at a slot hashed from the key, so a guest usually gets
/// the same ids each time it is created. Keys `NAME@PLACE` share one range per NAME: a
/// VM being live-migrated runs on two hosts at once, and its two QEMUs must reach each
/// other's sockets.
pub fn allocate(key: &str, owner: &Path) -> Result<u32> {
    allocate_in(Path::new(DIR), key, owner)
}

fn allocate_in(dir: &Path, key: &str, owner: &Path) -> Result<u32> {
    if key.is_empty() || key.contains('/') || key.starts_with('.') {
        anyhow::bail!("bad uid range key {key:?}");
    }
    let family = key.find('@').map(|i| &key[..=i]);
    let mut used = std::collections::HashSet::new();
    let mut shared = None;
    for e in fs::read_dir(dir)?.flatten() {
        let Ok(k) = e.file_name().into_string() else {
            continue;
        };
        if k.starts_with('.') {
            continue;
        }
        match read(dir, &k) {
            Some((first, path)) if k != key && path.exists() => {
                if family.is_some_and(|f| k.starts_with(f)) {
                    shared = Some(first);
                }
                used.insert(first);
            }
            _ => {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let start = fnv1a(family.unwrap_or(key)) % SLOTS;
    let first = match shared {
        Some(first) => first,
        None => (0..SLOTS)
            .map(|i| FIRST + ((start + i) % SLOTS) * RANGE)
            .find(|b| !used.contains(b))
            .context("no free guest uid range")?,
    };
    let record = dir.join(key);
    fs::write(&record, format!("{first} {}\n", owner.display()))
        .with_context(|| format!("writing {}", record.display()))?;
    Ok(first)
}

fn read(dir: &Path, key: &str) -> Option<(u32, PathBuf)> {
    let text = fs::read_to_string(dir.join(key)).ok()?;
    let (first, owner) = text.trim_end().split_once(' ')?;
    Some((first.parse().ok()?, PathBuf::from(owner)))
}

/// The first uid of `key`'s range, if it has one.
pub fn lookup(key: &str) -> Option<u32> {
    read(Path::new(DIR), key).map(|(first, _)| first)
}

/// Forgets `key`'s range (a missing record is not an error).
pub fn release(key: &str) {
    let _ = fs::remove_file(Path::new(DIR).join(key));
}

/// Forgets every range whose key starts with `prefix` (a cluster's, when it goes down),
/// after ending any process still running as one of its uids.
pub fn release_prefix(prefix: &str) {
    for e in fs::read_dir(DIR).into_iter().flatten().flatten() {
        let key = e.file_name().to_string_lossy().into_owned();
        if key.starts_with(prefix) {
            if let Some((first, _)) = read(Path::new(DIR), &key) {
                crate::host::procs::kill_uids(first..first + RANGE);
            }
            let _ = fs::remove_file(e.path());
        }
    }
}

fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_distinct_stable_and_reclaimed() {
        let top = std::env::temp_dir().join(format!("violin-uids-{}", std::process::id()));
        let dir = top.join("uids");
        fs::create_dir_all(&dir).unwrap();
        let owner = top.join("owner");
        fs::write(&owner, "").unwrap();
        let gone = top.join("gone");
        // Keys that would hash to the same slot still get distinct ranges.
        let a = allocate_in(&dir, "a", &owner).unwrap();
        fs::write(dir.join("b"), format!("{a} {}\n", owner.display())).unwrap();
        let a2 = allocate_in(&dir, "a", &owner).unwrap();
        assert_ne!(a, a2, "a's old slot is taken by b");
        let c = allocate_in(&dir, "c", &gone).unwrap();
        for first in [a, a2, c] {
            assert!((FIRST..0x7000_0000).contains(&first) && first % RANGE == 0);
        }
        // c's owner does not exist: the next allocation reclaims its record.
        allocate_in(&dir, "d", &owner).unwrap();
        assert!(
            read(&dir, "c").is_none(),
            "c's stale range was not reclaimed"
        );
        assert_eq!(read(&dir, "d").map(|r| r.1), Some(owner.clone()));
        // With b gone, a gets its hashed slot back.
        fs::remove_file(dir.join("b")).unwrap();
        assert_eq!(allocate_in(&dir, "a", &owner).unwrap(), a);
        assert!(allocate_in(&dir, "../x", &owner).is_err());
        // A VM on two hosts at once shares its range; the range outlives either copy.
        let h1 = allocate_in(&dir, "vm@h1", &owner).unwrap();
        assert_eq!(allocate_in(&dir, "vm@h2", &owner).unwrap(), h1);
        fs::remove_file(dir.join("vm@h1")).unwrap();
        assert_eq!(allocate_in(&dir, "vm@h3", &owner).unwrap(), h1);
        assert_ne!(allocate_in(&dir, "vm2@h1", &owner).unwrap(), h1);
        fs::remove_dir_all(&top).unwrap();
    }
}
