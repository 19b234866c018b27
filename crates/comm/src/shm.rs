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
    base: *mut u8,
    len: usize,
    /// The negotiated TCP connection, watched for EOF (never read otherwise).
    liveness: TcpStream,
}

// SAFETY: the mapping is process-shared memory accessed only through atomics and through byte
// ranges that the SPSC protocol hands to one side at a time.
unsafe impl Send for ShmRing {}
unsafe impl Sync for ShmRing {}

impl Drop for ShmRing {
    fn drop(&mut self) {
        // SAFETY: base/len came from a successful mmap and are unmapped once.
        unsafe {
            libc::munmap(self.base.cast(), self.len);
        }
    }
}

fn map(path: &std::path::Path, create: bool) -> std::io::Result<(*mut u8, usize)> {
    use std::os::unix::fs::OpenOptionsExt;
    let len = HEADER + CAPACITY;
    let file =
        std::fs::OpenOptions::new().read(true).write(true).create_new(create).mode(0o600).open(path)?;
    if create {
        file.set_len(len as u64)?;
    } else if file.metadata()?.len() != len as u64 {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "ring file has the wrong size"));
    }
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh shared read-write mapping of a file of exactly `len` bytes.
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
    Ok((p.cast(), len))
}

impl ShmRing {
    /// Creates the ring file (zeroed by the kernel) at `path`; the producer side.
    pub fn create(path: &std::path::Path, liveness: TcpStream) -> std::io::Result<Self> {
        let (base, len) = map(path, true)?;
        Ok(ShmRing { base, len, liveness })
    }

    /// Maps a ring another rank created; the consumer side.
    pub fn open(path: &std::path::Path, liveness: TcpStream) -> std::io::Result<Self> {
        let (base, len) = map(path, false)?;
        Ok(ShmRing { base, len, liveness })
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping starts with a zero-initialised Header (atomics are valid at 0).
        unsafe { &*self.base.cast::<Header>() }
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: HEADER < len.
        unsafe { self.base.add(HEADER) }
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
/// and when ranks outnumber cores that costs more in switches than it gains. Idle turns yield;
/// after `SPIN` of them the thread sleeps on the futex of the direction still pending, in
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
    const SPIN: Duration = Duration::from_micros(500);
    let (mut sent, mut got) = (0, 0);
    let mut idle_since: Option<Instant> = None;
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
            idle_since = None;
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < SPIN {
            std::thread::yield_now();
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
