//! Batched map operations: many entries per bpf(2) call instead of one.
//!
//! The controller walks whole tables (the expiry sweep, `nat-ctl mappings`, adoption), up to a
//! million bindings with two sessions each. One `BPF_MAP_GET_NEXT_KEY` plus one
//! `BPF_MAP_LOOKUP_ELEM` per entry costs seconds of CPU at that size; `BPF_MAP_LOOKUP_BATCH`
//! (Linux 5.6) copies thousands of entries per call. aya 0.14 has no batch API, so this module
//! issues the commands itself through `syscall(SYS_bpf, ...)` with the `batch` member of
//! `union bpf_attr` (include/uapi/linux/bpf.h), on the descriptor of an aya map whose key and
//! value sizes aya has already checked against `K` and `V`.
//!
//! Kernel semantics relied on (kernel/bpf/hashtab.c `__htab_map_lookup_and_delete_batch`,
//! kernel/bpf/syscall.c `generic_map_delete_batch`/`generic_map_update_batch`):
//! - lookup: `in_batch` NULL starts at the beginning; `out_batch` receives an opaque cursor
//!   (for hash maps a 4-byte bucket index, for other maps a key) to pass as the next
//!   `in_batch`. Whole buckets are copied: a bucket with more entries than `count` fails with
//!   `ENOSPC` and nothing copied (retry with a larger `count`). `ENOENT` means the end of the
//!   map was reached; `count` then still says how many entries this last call copied.
//! - delete/update: the keys are processed in order and the call stops at the first failure,
//!   `count` saying how many were processed before it (a key already gone fails `ENOENT`).
//!
//! A hash map walked while the data path changes it gives what `get_next_key` gives: every
//! entry present throughout the walk exactly once; entries added or removed meanwhile may or
//! may not appear.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::{
    maps::{IterableMap, MapData},
    Pod,
};

/// Entries per batch call: large enough that the syscall's fixed cost is small next to the
/// per-entry copy (4096 entries of a 48-byte session are about 200 KiB of buffers), small
/// enough that one call takes well under a millisecond and callers can stop between calls.
pub const CHUNK: usize = 4096;
/// Bound on the `count` a lookup grows to when one hash bucket holds more entries than asked
/// for (`ENOSPC`). A bucket that long means a broken hash; it fails rather than growing on.
const MAX_CHUNK: usize = 1 << 20;
/// Below this many keys, `lookup_many` asks for each key; above it, it reads the whole map in
/// batches and picks them out (a single lookup costs about what ten batched entries cost).
pub const LOOKUP_MANY_BATCH_MIN: usize = 65_536;
/// Size of the opaque cursor buffers: 4 bytes for hash maps, a key for others (8 covers every
/// key type of ours that could be read with a key cursor; larger keys use their own size).
const CURSOR_MIN: usize = 8;

/// bpf(2) commands (include/uapi/linux/bpf.h `enum bpf_cmd`).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// `ENOTSUPP` (kernel-internal 524): what a map type without batch support returns.
const ENOTSUPP: i32 = 524;

/// The `batch` member of `union bpf_attr`. Passing its size (not the whole union's) is allowed:
/// the kernel zero-fills the rest of the union.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Issues `cmd` with `attr`; on failure returns the error, with `attr.count` updated either way.
fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised `batch` attribute of the size passed; every pointer
    // in it refers to a live buffer of the length its `count` and the map's key and value sizes
    // imply (ensured by the callers), and the kernel writes only within those buffers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether `e` says the kernel or the map type has no batch operations (before Linux 5.6, or a
/// map type without them): callers may then fall back to one entry per call.
pub fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(ENOTSUPP) | Some(libc::EOPNOTSUPP)
    )
}

fn fd_of<K: Pod, V: Pod, M: IterableMap<K, V>>(map: &M) -> BorrowedFd<'_> {
    let data: &MapData = map.map();
    data.fd().as_fd()
}

/// Reads a map chunk by chunk (`BPF_MAP_LOOKUP_BATCH`). The caller may stop between chunks.
pub struct BatchReader<'m, K, V> {
    fd: BorrowedFd<'m>,
    /// Cursor for the next call; `None` before the first.
    cursor: Option<Vec<u8>>,
    out_cursor: Vec<u8>,
    done: bool,
    chunk: usize,
    keys: Vec<K>,
    values: Vec<V>,
}

impl<'m, K: Pod, V: Pod> BatchReader<'m, K, V> {
    /// A reader over `map` (an aya map whose key and value types are `K` and `V`).
    pub fn new<M: IterableMap<K, V>>(map: &'m M) -> Self {
        Self::with_chunk(map, CHUNK)
    }

    /// As `new`, with `chunk` entries per call (at least 1).
    pub fn with_chunk<M: IterableMap<K, V>>(map: &'m M, chunk: usize) -> Self {
        let cursor_len = std::mem::size_of::<K>().max(CURSOR_MIN);
        BatchReader {
            fd: fd_of(map),
            cursor: None,
            out_cursor: vec![0; cursor_len],
            done: false,
            chunk: chunk.max(1),
            keys: Vec::new(),
            values: Vec::new(),
        }
    }

    /// The next chunk of entries, `None` once the whole map has been read.
    pub fn next_chunk(&mut self) -> io::Result<Option<(&[K], &[V])>> {
        // Each iteration either ends the walk, returns entries, or doubles `chunk` (bounded by
        // MAX_CHUNK); a call that copies nothing without ENOENT cannot repeat forever because
        // the kernel's cursor moves past the buckets it visited.
        loop {
            if self.done {
                return Ok(None);
            }
            self.keys.clear();
            self.values.clear();
            self.keys.reserve(self.chunk);
            self.values.reserve(self.chunk);
            let mut attr = BatchAttr {
                in_batch: self.cursor.as_ref().map_or(0, |c| c.as_ptr() as u64),
                out_batch: self.out_cursor.as_mut_ptr() as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: self.chunk as u32,
                map_fd: self.fd.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            let result = bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr);
            let copied = (attr.count as usize).min(self.chunk);
            match result {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => self.done = true,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && copied == 0 => {
                    // One bucket holds more entries than `chunk`: ask for more at once.
                    if self.chunk >= MAX_CHUNK {
                        return Err(e);
                    }
                    self.chunk = (self.chunk * 2).min(MAX_CHUNK);
                    continue;
                }
                Err(e) => return Err(e),
            }
            // SAFETY: the kernel wrote `copied` whole keys and values (at most the capacity
            // reserved above), and `K`, `V` are `Pod`: every byte pattern is a valid value.
            unsafe {
                self.keys.set_len(copied);
                self.values.set_len(copied);
            }
            if !self.done {
                let next = self.cursor.get_or_insert_with(|| vec![0; self.out_cursor.len()]);
                next.copy_from_slice(&self.out_cursor);
            }
            if copied == 0 {
                continue;
            }
            return Ok(Some((&self.keys, &self.values)));
        }
    }
}

/// Every entry of `map`, read in batches.
pub fn read_all<K: Pod, V: Pod, M: IterableMap<K, V>>(map: &M) -> io::Result<Vec<(K, V)>> {
    let mut reader = BatchReader::new(map);
    let mut all = Vec::new();
    while let Some((keys, values)) = reader.next_chunk()? {
        all.extend(keys.iter().copied().zip(values.iter().copied()));
    }
    Ok(all)
}

/// Deletes `keys` from `map` (`BPF_MAP_DELETE_BATCH`), `CHUNK` per call. A key already gone is
/// skipped. Returns the indexes (into `keys`) of the keys that were not there.
pub fn delete<K: Pod, V: Pod, M: IterableMap<K, V>>(map: &M, keys: &[K]) -> io::Result<Vec<usize>> {
    let fd = fd_of(map);
    let mut missing = Vec::new();
    let mut start = 0;
    // Each iteration processes at least one key (deleted or skipped), so it ends.
    while start < keys.len() {
        let end = keys.len().min(start + CHUNK);
        let mut attr = BatchAttr {
            keys: keys[start..end].as_ptr() as u64,
            count: (end - start) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let result = bpf_batch(BPF_MAP_DELETE_BATCH, &mut attr);
        let processed = (attr.count as usize).min(end - start);
        match result {
            Ok(()) => start = end,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // Stopped at keys[start + processed], which is gone already.
                missing.push(start + processed);
                start += processed + 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(missing)
}

/// Writes `entries` into `map` (`BPF_MAP_UPDATE_BATCH` with `BPF_ANY`), `CHUNK` per call.
pub fn update<K: Pod, V: Pod, M: IterableMap<K, V>>(map: &M, entries: &[(K, V)]) -> io::Result<()> {
    let fd = fd_of(map);
    let (keys, values): (Vec<K>, Vec<V>) = entries.iter().copied().unzip();
    let mut start = 0;
    while start < keys.len() {
        let end = keys.len().min(start + CHUNK);
        let mut attr = BatchAttr {
            keys: keys[start..end].as_ptr() as u64,
            values: values[start..end].as_ptr() as u64,
            count: (end - start) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr)?;
        start = end;
    }
    Ok(())
}

/// The values of those of `keys` that are in `map`: one lookup per key when there are few,
/// else one batched read of the whole map (see `LOOKUP_MANY_BATCH_MIN`).
pub fn lookup_many<K: Pod + Eq + Hash, V: Pod, M: IterableMap<K, V>>(
    map: &M,
    keys: &[K],
) -> io::Result<HashMap<K, V>> {
    if keys.len() < LOOKUP_MANY_BATCH_MIN {
        return Ok(keys
            .iter()
            .filter_map(|k| map.get(k).ok().map(|v| (*k, v)))
            .collect());
    }
    let wanted: HashSet<&K> = keys.iter().collect();
    let mut found = HashMap::with_capacity(keys.len());
    let mut reader = BatchReader::new(map);
    while let Some((ks, vs)) = reader.next_chunk()? {
        for (k, v) in ks.iter().zip(vs) {
            if wanted.contains(k) {
                found.insert(*k, *v);
            }
        }
    }
    Ok(found)
}

/// Adds `adds` to the counters stored in `map` under the same keys (absent counts as 0): one
/// lookup per key (or one batched read), one batched write. Read-modify-write: only for maps
/// that this process alone writes (the controller's "released" tallies).
pub fn add_to_counts<K: Pod + Eq + Hash, M: IterableMap<K, u64>>(
    map: &M,
    adds: &HashMap<K, u64>,
) -> io::Result<()> {
    if adds.is_empty() {
        return Ok(());
    }
    let keys: Vec<K> = adds.keys().copied().collect();
    let current = lookup_many(map, &keys)?;
    let entries: Vec<(K, u64)> = adds
        .iter()
        .map(|(k, n)| (*k, current.get(k).copied().unwrap_or(0) + n))
        .collect();
    update(map, &entries)
}
