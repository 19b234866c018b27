//! Live state: an in-memory checkpoint of every step that costs no copy.
//!
//! The AdamW moments live in one of two files on tmpfs, mapped into the trainer (`slot-0.bin`,
//! `slot-1.bin`), with a copy of the weights. Each optimizer step reads the current slot's moments
//! and writes the new ones, and the new weights, into the other slot (the update is out of place,
//! which costs the same as in place, plus one store stream for the weights' copy), then marks
//! that slot valid with its step number. The slot being written is marked invalid first, so at
//! any instant, including a SIGKILL in the middle of an update, at least one slot holds a whole,
//! consistent state: the last finished step. A restarted rank maps the files again and trains on
//! from them without reading or copying anything.
//!
//! The files belong to the agent's memory directory, so they outlive the rank. In plain data
//! parallelism every rank holds the same state, so every node keeping its own slots is already
//! the buddy copy: a rank that lost its node gets the state from any other rank over the group.
//!
//! Slot layout: a 4 KiB header, then the weights, first moments and second moments as f32.
//! Header (little-endian): magic, step (u64::MAX while being written), parameter count,
//! configuration fingerprint, and the step's [`StepHeader`] bytes (as sent over the group).

use crate::data::DataCursor;
use crate::error::{Error, Result};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"MYRLIVE1";
const HEADER_BYTES: usize = 4096;
const INVALID: u64 = u64::MAX;
/// Byte offsets in the header: the step word (the slot's validity), the parameter count, the
/// configuration fingerprint, then the [`StepHeader`]'s bytes.
const STEP_AT: usize = 8;
const COUNT_AT: usize = 16;
const FINGERPRINT_AT: usize = 24;
const STEP_HEADER_AT: usize = 32;

/// A slot file, mapped whole.
struct Mapping {
    map: comm::SharedMap,
}

impl Mapping {
    /// Maps `path`, creating it or resizing it to `len` bytes (an existing file of that size
    /// keeps its contents).
    fn open(path: &Path, len: usize) -> Result<Mapping> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let current = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if current != len as u64 {
            file.set_len(len as u64).map_err(|e| Error::io(path, e))?;
        }
        let map = comm::SharedMap::new(&file, len).map_err(|e| Error::io(path, e))?;
        Ok(Mapping { map })
    }

    fn ptr(&self) -> *mut u8 {
        self.map.ptr()
    }

    fn bytes(&self, range: std::ops::Range<usize>) -> &[u8] {
        assert!(range.end <= HEADER_BYTES);
        // SAFETY: the header lies inside the mapping; only the step word is written concurrently
        // with reads, and that one is only touched atomically.
        unsafe { std::slice::from_raw_parts(self.ptr().add(range.start), range.len()) }
    }

    fn u64_at(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.bytes(at..at + 8).try_into().expect("8 bytes"))
    }

    fn step(&self) -> &AtomicU64 {
        // SAFETY: 8-byte aligned (page-aligned mapping + 8) and inside the header.
        unsafe { &*(self.ptr().add(STEP_AT) as *const AtomicU64) }
    }

    /// Writes header bytes. The caller makes sure no reader expects them stable (the slot is
    /// marked invalid while they change).
    fn write(&self, at: usize, bytes: &[u8]) {
        assert!(at + bytes.len() <= HEADER_BYTES && at >= COUNT_AT);
        // SAFETY: inside the header, never overlapping the atomic step word (at ≥ 16).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr().add(at), bytes.len()) }
    }
}

/// A buffer of f32s: owned, or a view of part of a live-state slot. Derefs to a slice, so the
/// model and optimizer use either the same way.
pub struct Buf {
    inner: Inner,
}

enum Inner {
    Owned(Vec<f32>),
    /// `len` f32s at `ptr` inside `_map`; no other `Buf` covers them.
    Mapped {
        _map: Arc<Mapping>,
        ptr: *mut f32,
        len: usize,
    },
}

// SAFETY: a mapped Buf is the only handle on its bytes, like an owned Vec.
unsafe impl Send for Buf {}
unsafe impl Sync for Buf {}

impl Buf {
    fn view(map: &Arc<Mapping>, first: usize, len: usize) -> Buf {
        assert!(HEADER_BYTES + (first + len) * 4 <= map.map.len());
        // SAFETY: in bounds (asserted) and 4-byte aligned (page-aligned mapping + 4 KiB header).
        let ptr = unsafe { map.ptr().add(HEADER_BYTES).cast::<f32>().add(first) };
        Buf { inner: Inner::Mapped { _map: map.clone(), ptr, len } }
    }
}

impl From<Vec<f32>> for Buf {
    fn from(v: Vec<f32>) -> Buf {
        Buf { inner: Inner::Owned(v) }
    }
}

impl Default for Buf {
    fn default() -> Buf {
        Vec::new().into()
    }
}

impl Deref for Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &self.inner {
            Inner::Owned(v) => v,
            // SAFETY: see `Inner::Mapped`.
            Inner::Mapped { ptr, len, .. } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
        }
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        match &mut self.inner {
            Inner::Owned(v) => v,
            // SAFETY: see `Inner::Mapped`; `&mut self` makes this the only live reference.
            Inner::Mapped { ptr, len, .. } => unsafe { std::slice::from_raw_parts_mut(*ptr, *len) },
        }
    }
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mapped = matches!(self.inner, Inner::Mapped { .. });
        write!(f, "Buf({} f32s{})", self.len(), if mapped { ", mapped" } else { "" })
    }
}

/// Everything but the tensors that a step's state needs.
#[derive(Clone, Debug, PartialEq)]
pub struct StepHeader {
    pub step: u64,
    pub adam_t: u64,
    pub rng_state: u64,
    pub data_cursor: DataCursor,
}

/// Bytes of an encoded [`StepHeader`]: three u64s, the cursor's JSON length (u32) and the JSON.
const STEP_HEADER_BYTES: usize = 256;
/// Words of a [`StepHeader`] sent over a collective (raw bits, not values).
pub const HEADER_WORDS: usize = STEP_HEADER_BYTES / 4;

impl StepHeader {
    fn to_bytes(&self) -> [u8; STEP_HEADER_BYTES] {
        let cursor = serde_json::to_vec(&self.data_cursor).expect("a cursor serialises");
        assert!(28 + cursor.len() <= STEP_HEADER_BYTES, "data cursor too long for the header");
        let mut bytes = [0u8; STEP_HEADER_BYTES];
        for (i, x) in [self.step, self.adam_t, self.rng_state].into_iter().enumerate() {
            bytes[8 * i..8 * i + 8].copy_from_slice(&x.to_le_bytes());
        }
        bytes[24..28].copy_from_slice(&(cursor.len() as u32).to_le_bytes());
        bytes[28..28 + cursor.len()].copy_from_slice(&cursor);
        bytes
    }

    fn from_bytes(bytes: &[u8]) -> Result<StepHeader> {
        let u = |i: usize| u64::from_le_bytes(bytes[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes")) as usize;
        let cursor = bytes
            .get(28..28 + len)
            .and_then(|b| serde_json::from_slice(b).ok())
            .ok_or_else(|| Error::Config("live state header: unreadable data cursor".into()))?;
        Ok(StepHeader { step: u(0), adam_t: u(1), rng_state: u(2), data_cursor: cursor })
    }

    pub fn to_words(&self) -> [f32; HEADER_WORDS] {
        let mut words = [0f32; HEADER_WORDS];
        for (w, b) in words.iter_mut().zip(self.to_bytes().chunks_exact(4)) {
            *w = f32::from_bits(u32::from_le_bytes(b.try_into().expect("4 bytes")));
        }
        words
    }

    pub fn from_words(words: &[f32; HEADER_WORDS]) -> Result<StepHeader> {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_bits().to_le_bytes()).collect();
        Self::from_bytes(&bytes)
    }
}

/// A u64 as two f32 words for a collective (raw bits, not values), and back.
pub(crate) fn u64_to_words(x: u64) -> [f32; 2] {
    [f32::from_bits(x as u32), f32::from_bits((x >> 32) as u32)]
}

pub(crate) fn words_to_u64(words: &[f32]) -> u64 {
    words[0].to_bits() as u64 | (words[1].to_bits() as u64) << 32
}

/// The two slot files of one rank.
///
/// The trainer's moments are views of the current slot, and the update writes the next ones
/// into the other slot. Weights are different: GEMMs read them over and over, and tmpfs pages
/// are 4 KiB where the trainer's own buffers are 2 MiB. With the weights in the slot too, a
/// 4-rank demo's steps were 8% slower here (TLB misses, presumably; not measured directly). So
/// the trainer keeps its weights in its own memory and the update writes each new weight twice,
/// there and into the slot: one extra store stream.
pub struct LiveSlots {
    maps: [Arc<Mapping>; 2],
    n: usize,
    fingerprint: u64,
    /// The slot the trainer's moments are views of; the other is written next.
    current: usize,
    /// Each slot's weights, once [`LiveSlots::start`]ed.
    weights: Option<[Buf; 2]>,
    /// The other slot's moments (first, second) while the trainer holds the current one's.
    other_moments: Option<[Buf; 2]>,
    /// The current slot's header, written once the step is reported.
    pending: Option<StepHeader>,
}

/// Where an update writes when the state is live: the other slot.
pub struct SlotOutputs<'a> {
    pub weights: &'a mut [f32],
    pub exp_avg: &'a mut [f32],
    pub exp_avg_sq: &'a mut [f32],
}

impl LiveSlots {
    /// Opens (or creates) the slot files under `dir` for `n` parameters of the configuration
    /// whose [`fingerprint`] is given.
    pub fn open(dir: &Path, n: usize, fingerprint: u64) -> Result<LiveSlots> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let len = HEADER_BYTES + 3 * n * 4;
        let open = |i: usize| Mapping::open(&dir.join(format!("slot-{i}.bin")), len).map(Arc::new);
        Ok(LiveSlots {
            maps: [open(0)?, open(1)?],
            n,
            fingerprint,
            current: 0,
            weights: None,
            other_moments: None,
            pending: None,
        })
    }

    /// The valid state a slot holds, if any: its header, when the slot is complete and was
    /// written by this configuration.
    pub fn held(&self, slot: usize) -> Option<StepHeader> {
        let map = &self.maps[slot];
        let step = map.step().load(Ordering::Acquire);
        if step == INVALID
            || map.bytes(0..8) != MAGIC
            || map.u64_at(COUNT_AT) != self.n as u64
            || map.u64_at(FINGERPRINT_AT) != self.fingerprint
        {
            return None;
        }
        let header =
            StepHeader::from_bytes(map.bytes(STEP_HEADER_AT..STEP_HEADER_AT + STEP_HEADER_BYTES)).ok()?;
        (header.step == step).then_some(header)
    }

    /// The newest valid slot and its header.
    pub fn newest(&self) -> Option<(usize, StepHeader)> {
        (0..2).filter_map(|i| Some((i, self.held(i)?))).max_by_key(|(_, h)| h.step)
    }

    /// Views of slot `slot`'s weights, first and second moments. Before [`LiveSlots::start`]
    /// only, and never twice for one slot at a time: views alias nothing else.
    pub fn take_views(&self, slot: usize) -> [Buf; 3] {
        assert!(self.weights.is_none(), "views are handed out before the slots start");
        let n = self.n;
        [0, 1, 2].map(|k| Buf::view(&self.maps[slot], k * n, n))
    }

    /// The trainer now holds slot `current`'s moments (views from [`LiveSlots::take_views`],
    /// whose weights view it has dropped); the other slot is written by the next step.
    pub fn start(&mut self, current: usize) {
        let n = self.n;
        self.current = current;
        let other = 1 - current;
        self.invalidate(other);
        self.weights = Some([0, 1].map(|i| Buf::view(&self.maps[i], 0, n)));
        self.other_moments = Some([1, 2].map(|k| Buf::view(&self.maps[other], k * n, n)));
    }

    fn invalidate(&self, slot: usize) {
        self.maps[slot].step().store(INVALID, Ordering::Release);
    }

    /// Marks the slot about to be written invalid and hands out where the update writes.
    pub fn begin_write(&mut self) -> SlotOutputs<'_> {
        // The step before must be whole first: the slot about to be overwritten is the only other.
        self.commit_pending();
        let other = 1 - self.current;
        self.invalidate(other);
        let weights = self.weights.as_mut().expect("LiveSlots::start was called");
        let [exp_avg, exp_avg_sq] = self.other_moments.as_mut().expect("LiveSlots::start was called");
        SlotOutputs { weights: &mut weights[other], exp_avg, exp_avg_sq }
    }

    /// After the update wrote the other slot: its moments become the trainer's (the trainer's
    /// go back to this slot set) and it becomes the current slot, still invalid: `header` is
    /// written by [`LiveSlots::commit_pending`], once the step has been reported. A step is
    /// never restored that nobody heard of, so its loss and time are never missing from the
    /// run's record.
    pub fn finish_write(&mut self, exp_avg: &mut Buf, exp_avg_sq: &mut Buf, header: StepHeader) {
        let [m, v] = self.other_moments.as_mut().expect("LiveSlots::start was called");
        std::mem::swap(m, exp_avg);
        std::mem::swap(v, exp_avg_sq);
        self.current = 1 - self.current;
        self.pending = Some(header);
    }

    /// Makes the current slot valid with the header [`LiveSlots::finish_write`] left.
    pub fn commit_pending(&mut self) {
        if let Some(header) = self.pending.take() {
            self.commit(self.current, &header);
        }
    }

    /// Writes slot `slot`'s header; its step goes last, so the slot counts only once complete.
    pub fn commit(&self, slot: usize, header: &StepHeader) {
        let map = &self.maps[slot];
        debug_assert_eq!(
            map.step().load(Ordering::Relaxed),
            INVALID,
            "a slot is rewritten only once invalid"
        );
        map.write(COUNT_AT, &(self.n as u64).to_le_bytes());
        map.write(FINGERPRINT_AT, &self.fingerprint.to_le_bytes());
        map.write(STEP_HEADER_AT, &header.to_bytes());
        // SAFETY: the magic is the first 8 bytes of the mapping, written before the step.
        unsafe { std::ptr::copy_nonoverlapping(MAGIC.as_ptr(), map.ptr(), 8) };
        map.step().store(header.step, Ordering::Release);
    }

    /// Marks both slots invalid (their state must not be used again).
    pub fn discard(&self) {
        self.invalidate(0);
        self.invalidate(1);
    }
}

/// A stable hash of the model and training configuration: slots written by another job or
/// another configuration are never taken for this one's.
pub fn fingerprint(model: &crate::ModelConfig, train: &crate::TrainConfig) -> u64 {
    let text = serde_json::to_vec(&(model, train)).expect("configs serialise");
    // FNV-1a: stable across builds, unlike std's hasher.
    text.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}
