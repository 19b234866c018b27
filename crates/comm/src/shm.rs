//! A shared-memory link between two ranks on the same host: one single-producer single-consumer
//! byte ring in a mapped file, with futex waits. Like NCCL's SHM transport, it replaces the two
//! kernel copies and the syscalls of a loopback TCP stream with one copy in, one copy out.
//!
//! The TCP connection the ring was negotiated over stays open beside it: it carries no data,
//! but its EOF is how a dead or failed peer is noticed within milliseconds, and shutting it is
//! how this rank tells its peer it gave up. Waits are sliced into short futex sleeps so abort,
//! peer loss and the collective's deadline are all checked while waiting.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Ring capacity. Big enough that a 1 MiB chunk is in flight while the next is written.
const CAPACITY: usize = 2 << 20;
/// Header: producer and consumer counters on separate cache lines, and their futex words.
const HEADER: usize = 256;
/// Longest single futex sleep: bounds how late abort, peer loss or the deadline is seen.
const WAIT_SLICE: Duration = Duration::from_millis(10);
/// Largest piece published at once, so the consumer starts before the producer finishes.
const PIECE: usize = 128 << 10;

#[repr(C)]
struct Header {
    written: AtomicU64,
    _pad0: [u8; 56],
    read: AtomicU64,
    _pad1: [u8; 56],
    /// Bumped after every publish / consume; futex words for the other side's waits.
    written_seq: AtomicU32,
    _pad2: [u8; 60],
    read_seq: AtomicU32,
}

/// Why a wait on the ring ended without progress.
pub enum Stall {
    Deadline,
    PeerClosed,
    Aborted,
}

pub struct ShmRing {
    map: SharedMap,
    /// The negotiated TCP connection, watched for EOF (never read otherwise).
    liveness: TcpStream,
}

// SAFETY: the mapping is process-shared memory accessed only through atomics and through byte
// ranges that the SPSC protocol hands to one side at a time.
unsafe impl Send for ShmRing {}
unsafe impl Sync for ShmRing {}

/// A shared, read-write mapping of a whole file, unmapped on drop. What the bytes mean, and who
/// may touch which, is the owner's business.
pub struct SharedMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory; the owners (the ring protocol, the trainer's live slots) govern access.
unsafe impl Send for SharedMap {}
unsafe impl Sync for SharedMap {}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap and are unmapped once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

impl SharedMap {
    /// Maps the first `len` bytes of `file` (which must be at least that long), shared.
    pub fn new(file: &std::fs::File, len: usize) -> std::io::Result<SharedMap> {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared read-write mapping of a file we hold open; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SharedMap { ptr: p.cast(), len })
    }

    /// The first byte (page-aligned).
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn map(path: &std::path::Path, create: bool) -> std::io::Result<SharedMap> {
    use std::os::unix::fs::OpenOptionsExt;
    let len = HEADER + CAPACITY;
    let file =
        std::fs::OpenOptions::new().read(true).write(true).create_new(create).mode(0o600).open(path)?;
    if create {
        file.set_len(len as u64)?;
    } else if file.metadata()?.len() != len as u64 {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "ring file has the wrong size"));
    }
    SharedMap::new(&file, len)
}

impl ShmRing {
    /// Creates the ring file (zeroed by the kernel) at `path`; the producer side.
    pub fn create(path: &std::path::Path, liveness: TcpStream) -> std::io::Result<Self> {
        Ok(ShmRing { map: map(path, true)?, liveness })
    }

    /// Maps a ring another rank created; the consumer side.
    pub fn open(path: &std::path::Path, liveness: TcpStream) -> std::io::Result<Self> {
        Ok(ShmRing { map: map(path, false)?, liveness })
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping starts with a zero-initialised Header (atomics are valid at 0).
        unsafe { &*self.map.ptr().cast::<Header>() }
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: HEADER < len.
        unsafe { self.map.ptr().add(HEADER) }
    }

    /// True when the peer's TCP side is closed (it exited, failed or gave up).
    fn peer_gone(&self) -> bool {
        let mut byte = [0u8; 1];
        let _ = self.liveness.set_nonblocking(true);
        match self.liveness.peek(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != ErrorKind::WouldBlock,
        }
    }

    /// Sleeps until `word` may have changed from `seen`, or one wait slice passes.
    fn wait(
        &self,
        word: &AtomicU32,
        seen: u32,
        deadline: Instant,
        aborted: &AtomicBool,
    ) -> Result<(), Stall> {
        if aborted.load(Ordering::Acquire) {
            return Err(Stall::Aborted);
        }
        // A peer may publish its last piece and exit between our look at the ring and this
        // check: only a peer that is gone *and* moved nothing since `seen` has failed us.
        if self.peer_gone() && word.load(Ordering::Acquire) == seen {
            return Err(Stall::PeerClosed);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Stall::Deadline);
        }
        let slice = left.min(WAIT_SLICE);
        let ts = libc::timespec { tv_sec: 0, tv_nsec: slice.as_nanos() as libc::c_long };
        // SAFETY: `word` lives in the shared mapping; FUTEX_WAIT only reads it.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT,
                seen,
                &ts as *const libc::timespec,
            );
        }
        Ok(())
    }

    fn wake(word: &AtomicU32) {
        word.fetch_add(1, Ordering::Release);
        // SAFETY: futex wake on a word in the shared mapping.
        unsafe {
            libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1);
        }
    }

    /// Producer: copies all of `bytes` into the ring as space frees up.
    pub fn send(&self, bytes: &[u8], deadline: Instant, aborted: &AtomicBool) -> Result<(), Stall> {
        let h = self.header();
        let mut sent = 0;
        while sent < bytes.len() {
            let seen = h.read_seq.load(Ordering::Acquire);
            let written = h.written.load(Ordering::Relaxed);
            let free = CAPACITY - (written - h.read.load(Ordering::Acquire)) as usize;
            if free == 0 {
                self.wait(&h.read_seq, seen, deadline, aborted)?;
                continue;
            }
            let at = written as usize % CAPACITY;
            let n = free.min(CAPACITY - at).min(PIECE).min(bytes.len() - sent);
            // SAFETY: [at, at+n) is free ring space that only the producer writes until it
            // publishes `written`; the source is a live slice.
            unsafe { std::ptr::copy_nonoverlapping(bytes[sent..].as_ptr(), self.data().add(at), n) };
            h.written.store(written + n as u64, Ordering::Release);
            Self::wake(&h.written_seq);
            sent += n;
        }
        Ok(())
    }

    /// Consumer: takes exactly `len` bytes from the ring, handing each piece to `on_piece(offset,
    /// piece)` while it still lies in the ring (so a reduction reads it straight from shared
    /// memory, with no copy in between). Offsets and lengths are multiples of 4 when the producer
    /// only sends whole f32s.
    pub fn recv(
        &self,
        len: usize,
        deadline: Instant,
        aborted: &AtomicBool,
        mut on_piece: impl FnMut(usize, &[u8]),
    ) -> Result<(), Stall> {
        let h = self.header();
        let mut got = 0;
        while got < len {
            let seen = h.written_seq.load(Ordering::Acquire);
            let read = h.read.load(Ordering::Relaxed);
            let avail = (h.written.load(Ordering::Acquire) - read) as usize;
            if avail == 0 {
                self.wait(&h.written_seq, seen, deadline, aborted)?;
                continue;
            }
            let at = read as usize % CAPACITY;
            let n = avail.min(CAPACITY - at).min(len - got);
            // SAFETY: [at, at+n) was published by the producer (Acquire above) and is not
            // rewritten until `read` moves past it, which happens only after `on_piece` returns.
            let piece = unsafe { std::slice::from_raw_parts(self.data().add(at), n) };
            on_piece(got, piece);
            h.read.store(read + n as u64, Ordering::Release);
            Self::wake(&h.read_seq);
            got += n;
        }
        Ok(())
    }

    /// Producer, non-blocking: copies as much of `bytes` as fits now (at most one piece).
    fn try_send(&self, bytes: &[u8]) -> usize {
        let h = self.header();
        let written = h.written.load(Ordering::Relaxed);
        let free = CAPACITY - (written - h.read.load(Ordering::Acquire)) as usize;
        let at = written as usize % CAPACITY;
        let n = free.min(CAPACITY - at).min(PIECE).min(bytes.len());
        if n > 0 {
            // SAFETY: as in `send`.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.data().add(at), n) };
            h.written.store(written + n as u64, Ordering::Release);
            Self::wake(&h.written_seq);
        }
        n
    }

    /// Consumer, non-blocking: hands at most one available piece (up to `want` bytes) to
    /// `on_piece`; returns its length.
    fn try_recv(&self, want: usize, on_piece: &mut impl FnMut(&[u8])) -> usize {
        let h = self.header();
        let read = h.read.load(Ordering::Relaxed);
        let avail = (h.written.load(Ordering::Acquire) - read) as usize;
        let at = read as usize % CAPACITY;
        let n = avail.min(CAPACITY - at).min(PIECE).min(want);
        if n > 0 {
            // SAFETY: as in `recv`.
            on_piece(unsafe { std::slice::from_raw_parts(self.data().add(at), n) });
            h.read.store(read + n as u64, Ordering::Release);
            Self::wake(&h.read_seq);
        }
        n
    }
}

/// Sends `bytes` on `out` while receiving `len` bytes from `inp`, on one thread: each turn moves
/// whatever piece each ring allows. A thread per direction would double the runnable threads,
/// and when ranks outnumber cores that costs more in switches than it gains. Idle turns yield
/// (see [`Spin`]); then the thread sleeps on the futex of the direction still pending, in
/// `WAIT_SLICE`s, checking abort, peer loss and the deadline.
pub fn exchange(
    out: &ShmRing,
    bytes: &[u8],
    inp: &ShmRing,
    len: usize,
    deadline: Instant,
    aborted: &AtomicBool,
    mut on_piece: impl FnMut(usize, &[u8]),
) -> Result<(), (bool, Stall)> {
    let (mut sent, mut got) = (0, 0);
    let mut spin = Spin::default();
    while sent < bytes.len() || got < len {
        let mut moved = 0;
        if sent < bytes.len() {
            let n = out.try_send(&bytes[sent..]);
            sent += n;
            moved += n;
        }
        if got < len {
            let n = inp.try_recv(len - got, &mut |piece| on_piece(got, piece));
            got += n;
            moved += n;
        }
        if moved > 0 {
            spin.reset();
            continue;
        }
        if spin.keep_spinning() {
            continue;
        }
        // Sleep on whichever direction is stuck; `true` marks the receiving side in errors.
        if got < len {
            let h = inp.header();
            let seen = h.written_seq.load(Ordering::Acquire);
            if h.written.load(Ordering::Acquire) == h.read.load(Ordering::Relaxed) {
                inp.wait(&h.written_seq, seen, deadline, aborted).map_err(|s| (true, s))?;
            }
        } else {
            let h = out.header();
            let seen = h.read_seq.load(Ordering::Acquire);
            if (h.written.load(Ordering::Relaxed) - h.read.load(Ordering::Acquire)) as usize == CAPACITY {
                out.wait(&h.read_seq, seen, deadline, aborted).map_err(|s| (false, s))?;
            }
        }
        // While we slept on the receiving side, the peer we send to may have died with our
        // data unread: if it is gone and still no space frees up, nobody will ever read it.
        if sent < bytes.len() && out.peer_gone() {
            let n = out.try_send(&bytes[sent..]);
            if n == 0 {
                return Err((false, Stall::PeerClosed));
            }
            sent += n;
        }
    }
    Ok(())
}

/// What a rank does with one received message of the fused all-reduce.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Reduce-scatter hop: send own + received on, keep nothing.
    ReduceSend,
    /// Last reduce-scatter hop: own + received is final; keep it and send it on.
    ReduceKeepSend,
    /// All-gather hop: keep the final values and send them on.
    CopySend,
    /// Last all-gather hop: keep the final values.
    Copy,
}

/// Sum-all-reduce of `buf` over a ring whose every link is shared memory, in one streaming pass.
///
/// The buffer is cut into slices of `world × piece` floats and each slice runs the whole ring
/// schedule (world−1 reduce-scatter hops, world−1 all-gather hops) before the next begins. A
/// received message is combined with this rank's values and written straight into the outgoing
/// ring ("recv-reduce-send", as NCCL's primitives do), so partial sums never go back to `buf`:
/// per float, `buf` is read about twice and written once, against about five touches for
/// hop-by-hop exchanges. Each element is summed in ring order starting at a rank fixed by its
/// position, so the bits are the same on every rank and every run. Every rank of the group must
/// use this schedule (the group agrees at rendezvous).
pub fn all_reduce_fused(
    out: &ShmRing,
    inp: &ShmRing,
    buf: &mut [f32],
    rank: usize,
    world: usize,
    deadline: Instant,
    aborted: &AtomicBool,
) -> Result<(), (bool, Stall)> {
    let n = world;
    // Floats per ring message. At most n messages are in flight around the whole ring, so a
    // ring that holds 2n of them can never fill while its reader waits: no deadlock.
    let piece = (CAPACITY / 4 / (2 * n)).clamp(256, 16 << 10);
    for slice in buf.chunks_mut(n * piece) {
        let slice_len = slice.len();
        let seg = |k: usize| crate::group::segment(slice_len, n, k % n);
        // Message 0: this rank's own values of segment r−1.
        let first = seg(rank + n - 1);
        push(
            out,
            &mut |dst: &mut [f32], at: usize| {
                dst.copy_from_slice(&slice[first.start + at..first.start + at + dst.len()])
            },
            first.len(),
            deadline,
            aborted,
        )?;
        for j in 0..2 * n - 2 {
            let (k, role) = if j < n - 1 {
                ((rank + 2 * n - j - 2) % n, if j + 2 < n { Role::ReduceSend } else { Role::ReduceKeepSend })
            } else {
                let g = j - (n - 1);
                ((rank + 2 * n - g - 1) % n, if g + 2 < n { Role::CopySend } else { Role::Copy })
            };
            let range = seg(k);
            relay(inp, out, &mut slice[range], role, deadline, aborted)?;
        }
    }
    Ok(())
}

/// Produces `len` floats into `out`, asking `fill(dst, offset)` for each contiguous run.
fn push(
    out: &ShmRing,
    fill: &mut dyn FnMut(&mut [f32], usize),
    len: usize,
    deadline: Instant,
    aborted: &AtomicBool,
) -> Result<(), (bool, Stall)> {
    let h = out.header();
    let mut done = 0;
    let mut spin = Spin::default();
    while done < len {
        let seen = h.read_seq.load(Ordering::Acquire);
        let written = h.written.load(Ordering::Relaxed);
        let free = CAPACITY - (written - h.read.load(Ordering::Acquire)) as usize;
        let at = written as usize % CAPACITY;
        let m = (free.min(CAPACITY - at) / 4).min(len - done);
        if m == 0 {
            if !spin.keep_spinning() {
                out.wait(&h.read_seq, seen, deadline, aborted).map_err(|s| (false, s))?;
            }
            continue;
        }
        spin.reset();
        // SAFETY: [at, at + 4m) is free ring space owned by the producer until published;
        // ring offsets are multiples of 4 and the data area is 4-aligned.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.data().add(at).cast::<f32>(), m) };
        fill(dst, done);
        h.written.store(written + 4 * m as u64, Ordering::Release);
        ShmRing::wake(&h.written_seq);
        done += m;
    }
    Ok(())
}

/// Receives `own.len()` floats from `inp` and acts on them per `role`, writing to `out` when
/// the role sends on. Moves as much as both rings allow at once.
fn relay(
    inp: &ShmRing,
    out: &ShmRing,
    own: &mut [f32],
    role: Role,
    deadline: Instant,
    aborted: &AtomicBool,
) -> Result<(), (bool, Stall)> {
    let (hi, ho) = (inp.header(), out.header());
    let sends = role != Role::Copy;
    let mut done = 0;
    let mut spin = Spin::default();
    while done < own.len() {
        let seen_in = hi.written_seq.load(Ordering::Acquire);
        let read = hi.read.load(Ordering::Relaxed);
        let avail = (hi.written.load(Ordering::Acquire) - read) as usize;
        let r_at = read as usize % CAPACITY;
        let mut m = (avail.min(CAPACITY - r_at) / 4).min(own.len() - done);
        if m == 0 {
            if !spin.keep_spinning() {
                inp.wait(&hi.written_seq, seen_in, deadline, aborted).map_err(|s| (true, s))?;
            }
            continue;
        }
        let (seen_out, written) = (ho.read_seq.load(Ordering::Acquire), ho.written.load(Ordering::Relaxed));
        let w_at = written as usize % CAPACITY;
        if sends {
            let free = CAPACITY - (written - ho.read.load(Ordering::Acquire)) as usize;
            m = m.min(free.min(CAPACITY - w_at) / 4);
            if m == 0 {
                if !spin.keep_spinning() {
                    out.wait(&ho.read_seq, seen_out, deadline, aborted).map_err(|s| (false, s))?;
                }
                continue;
            }
        }
        spin.reset();
        // SAFETY: [r_at, r_at + 4m) is published input not yet consumed; [w_at, w_at + 4m) is
        // free output space; both 4-aligned (see `push`).
        let src = unsafe { std::slice::from_raw_parts(inp.data().add(r_at).cast::<f32>(), m) };
        let mine = &mut own[done..done + m];
        if sends {
            let dst = unsafe { std::slice::from_raw_parts_mut(out.data().add(w_at).cast::<f32>(), m) };
            match role {
                Role::ReduceSend => {
                    dst.iter_mut().zip(mine.iter()).zip(src).for_each(|((d, a), b)| *d = a + b)
                }
                Role::ReduceKeepSend => {
                    for ((d, a), b) in dst.iter_mut().zip(mine.iter_mut()).zip(src) {
                        *a += b;
                        *d = *a;
                    }
                }
                _ => {
                    mine.copy_from_slice(src);
                    dst.copy_from_slice(src);
                }
            }
            ho.written.store(written + 4 * m as u64, Ordering::Release);
            ShmRing::wake(&ho.written_seq);
        } else {
            mine.copy_from_slice(src);
        }
        hi.read.store(read + 4 * m as u64, Ordering::Release);
        ShmRing::wake(&hi.read_seq);
        done += m;
    }
    Ok(())
}

/// Brief yielding before a futex sleep: a peer on the other core usually frees space or
/// publishes data within microseconds, and sleeping costs two syscalls and a wake-up.
#[derive(Default)]
struct Spin {
    since: Option<Instant>,
}

impl Spin {
    const FOR: Duration = Duration::from_micros(200);

    /// Yields and returns true while the spin budget lasts; false once it is time to sleep.
    fn keep_spinning(&mut self) -> bool {
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() < Self::FOR {
            std::thread::yield_now();
            true
        } else {
            false
        }
    }

    fn reset(&mut self) {
        self.since = None;
    }
}
