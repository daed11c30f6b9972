//! One-way byte rings in shared memory, for TCP links between two processes on one host: the
//! bytes go through a mapping both processes share instead of through the kernel's loopback,
//! which saves a copy and the TCP stack on every byte. The TCP connection stays: it carries the
//! one-byte wake-ups that tell a sleeping peer to look at the ring again, and its closing is
//! how a peer's death is noticed, exactly as without the ring (see `tcp::Wire`).
//!
//! A ring is a file in /dev/shm that the writer creates (space reserved with `posix_fallocate`,
//! so a full tmpfs fails here rather than with SIGBUS later), the reader maps, and the writer
//! removes once both have mapped it. Layout: the writer's running count of bytes written and
//! the reader's "asleep" flag, then on a cache line of their own the reader's count of bytes
//! read and the writer's "asleep" flag, then the data.
//!
//! Wake-ups: a side about to sleep in `poll` raises its flag and looks at the ring once more
//! ([`ShmRing::reader_sleeps`], [`ShmRing::writer_sleeps`]); the other side, after moving
//! bytes, looks at the flag (the `bool` of [`ShmRing::write`] and [`ShmRing::read`]) and sends
//! a wake-up when it is up. A fence between each side's store and load makes at least one of
//! them see the other's, so a wake-up is never lost and none is sent while both are busy.

use std::fs::{File, OpenOptions};
use std::num::NonZeroUsize;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering, fence};

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

/// Data bytes of a ring: room for a few pieces in flight.
pub const CAPACITY: usize = 1 << 20;
/// The two counters, a cache line each.
const HEADER: usize = 128;

/// A mapped ring; the writer and the reader each hold one.
pub struct ShmRing {
    base: NonNull<u8>,
    capacity: usize,
}

// SAFETY: the mapping is plain shared memory; the counters are atomics, and the data bytes are
// written only by the one writer in the window the counters give it.
unsafe impl Send for ShmRing {}
unsafe impl Sync for ShmRing {}

impl ShmRing {
    /// A new ring in a fresh /dev/shm file (the writer's side); its path goes to the reader.
    pub fn create(tag: &str) -> std::io::Result<(ShmRing, PathBuf)> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = Path::new("/dev/shm").join(format!(
            "tessera-{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let made = (|| {
            let bytes = HEADER + CAPACITY;
            nix::fcntl::posix_fallocate(&file, 0, bytes as i64).map_err(std::io::Error::from)?;
            ShmRing::map(&file, bytes)
        })();
        match made {
            Ok(ring) => Ok((ring, path)),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Maps the ring at `path` (the reader's side).
    pub fn open(path: &Path) -> std::io::Result<ShmRing> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let bytes = file.metadata()?.len() as usize;
        if bytes != HEADER + CAPACITY {
            return Err(std::io::Error::other(format!(
                "{} has {bytes} bytes, not a ring's {}",
                path.display(),
                HEADER + CAPACITY
            )));
        }
        ShmRing::map(&file, bytes)
    }

    fn map(file: &File, bytes: usize) -> std::io::Result<ShmRing> {
        let length = NonZeroUsize::new(bytes).expect("invariant: a ring has bytes");
        // SAFETY: a shared mapping of a regular file of `bytes` bytes; unmapped in Drop.
        let base = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                file,
                0,
            )
        }
        .map_err(std::io::Error::from)?;
        Ok(ShmRing {
            base: base.cast(),
            capacity: bytes - HEADER,
        })
    }

    fn counter(&self, at: usize) -> &AtomicU64 {
        // SAFETY: the header's first two cache lines hold the counters, 8-byte aligned (the
        // mapping is page aligned); they live as long as the mapping.
        unsafe { &*(self.base.as_ptr().add(at) as *const AtomicU64) }
    }

    fn written(&self) -> &AtomicU64 {
        self.counter(0)
    }

    fn reader_asleep(&self) -> &AtomicU64 {
        self.counter(8)
    }

    fn read_count(&self) -> &AtomicU64 {
        self.counter(64)
    }

    fn writer_asleep(&self) -> &AtomicU64 {
        self.counter(72)
    }

    /// Reader, before sleeping: raises its flag and says whether bytes arrived meanwhile (then
    /// it must not sleep; the flag is lowered again).
    pub fn reader_sleeps(&self) -> bool {
        self.reader_asleep().store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let arrived =
            self.written().load(Ordering::Acquire) != self.read_count().load(Ordering::Relaxed);
        if arrived {
            self.reader_asleep().store(0, Ordering::Relaxed);
        }
        arrived
    }

    /// Reader, awake again.
    pub fn reader_woke(&self) {
        self.reader_asleep().store(0, Ordering::Relaxed);
    }

    /// Writer, before sleeping: raises its flag and says whether room came meanwhile.
    pub fn writer_sleeps(&self) -> bool {
        self.writer_asleep().store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let used = self
            .written()
            .load(Ordering::Relaxed)
            .wrapping_sub(self.read_count().load(Ordering::Acquire));
        let room = (used as usize) < self.capacity;
        if room {
            self.writer_asleep().store(0, Ordering::Relaxed);
        }
        room
    }

    /// Writer, awake again.
    pub fn writer_woke(&self) {
        self.writer_asleep().store(0, Ordering::Relaxed);
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: the data follows the header inside the mapping.
        unsafe { self.base.as_ptr().add(HEADER) }
    }

    /// Writer: copies as much of `src` as there is room for; returns how much, and whether the
    /// reader is asleep (then it needs a wake-up).
    pub fn write(&self, src: &[u8]) -> (usize, bool) {
        let head = self.written().load(Ordering::Relaxed);
        let tail = self.read_count().load(Ordering::Acquire);
        // The counters are in memory another process writes: whatever they say, no copy may
        // leave the data area (a sane peer keeps `head - tail` within the capacity).
        let room = self
            .capacity
            .saturating_sub(head.wrapping_sub(tail) as usize);
        let n = room.min(src.len());
        let at = (head % self.capacity as u64) as usize;
        let first = n.min(self.capacity - at);
        // SAFETY: bytes `[head, head + n)` are the writer's until it publishes them below; the
        // two pieces lie inside the data area.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.data().add(at), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), self.data(), n - first);
        }
        self.written()
            .store(head.wrapping_add(n as u64), Ordering::Release);
        fence(Ordering::SeqCst);
        (
            n,
            n > 0 && self.reader_asleep().load(Ordering::Relaxed) == 1,
        )
    }

    /// Reader: copies as much as has arrived into `dst`; returns how much, and whether the
    /// writer is asleep waiting for room (then it needs a wake-up).
    pub fn read(&self, dst: &mut [u8]) -> (usize, bool) {
        let tail = self.read_count().load(Ordering::Relaxed);
        let head = self.written().load(Ordering::Acquire);
        // Bounded by the capacity whatever the peer wrote into the counters (see `write`).
        let n = (head.wrapping_sub(tail) as usize)
            .min(self.capacity)
            .min(dst.len());
        let at = (tail % self.capacity as u64) as usize;
        let first = n.min(self.capacity - at);
        // SAFETY: bytes `[tail, tail + n)` were published by the writer and are the reader's
        // until it hands them back below.
        unsafe {
            std::ptr::copy_nonoverlapping(self.data().add(at), dst.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(self.data(), dst.as_mut_ptr().add(first), n - first);
        }
        self.read_count()
            .store(tail.wrapping_add(n as u64), Ordering::Release);
        fence(Ordering::SeqCst);
        (
            n,
            n > 0 && self.writer_asleep().load(Ordering::Relaxed) == 1,
        )
    }
}

impl Drop for ShmRing {
    fn drop(&mut self) {
        // SAFETY: mapped in `map` with this length; nothing uses it after the drop.
        let _ = unsafe { munmap(self.base.cast(), HEADER + self.capacity) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_cross_the_ring_in_order_through_wrap_arounds_and_full_rings() {
        let (writer, path) = ShmRing::create("test").unwrap();
        let reader = ShmRing::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let data: Vec<u8> = (0..5 * CAPACITY + 12345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let (mut sent, mut got) = (0, Vec::new());
        let mut buf = vec![0u8; 300_001];
        while got.len() < data.len() {
            let (n, _) = writer.write(&data[sent..(sent + 700_000).min(data.len())]);
            sent += n;
            assert!(
                sent - got.len() <= CAPACITY,
                "never more in flight than fits"
            );
            let (n, _) = reader.read(&mut buf);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, data);
        assert_eq!(writer.write(&[]).0, 0);
        assert_eq!(reader.read(&mut buf).0, 0, "nothing left");
    }

    #[test]
    fn a_side_about_to_sleep_is_woken_by_the_other_and_never_sleeps_on_work() {
        let (writer, path) = ShmRing::create("sleep").unwrap();
        let reader = ShmRing::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        // An empty ring: the reader may sleep, and the next write must wake it.
        assert!(!reader.reader_sleeps());
        assert_eq!(writer.write(b"abc"), (3, true));
        assert_eq!(
            writer.write(b"d"),
            (1, true),
            "asleep until it says it woke"
        );
        reader.reader_woke();
        assert_eq!(writer.write(b"e"), (1, false));
        // Bytes are there: the reader must not sleep.
        assert!(reader.reader_sleeps());
        assert_eq!(writer.write(b"f"), (1, false), "its flag went down again");
        let mut buf = vec![0u8; 16];
        assert_eq!(reader.read(&mut buf), (6, false));
        // A full ring: the writer may sleep, and the next read must wake it.
        let big = vec![7u8; CAPACITY];
        assert_eq!(writer.write(&big).0, CAPACITY);
        assert!(!writer.writer_sleeps());
        assert_eq!(reader.read(&mut buf), (16, true));
        writer.writer_woke();
        assert!(writer.writer_sleeps(), "room again: no sleep");
        assert_eq!(reader.read(&mut buf), (16, false));
    }

    #[test]
    fn counters_a_peer_corrupted_never_move_a_copy_outside_the_ring() {
        let (writer, path) = ShmRing::create("corrupt").unwrap();
        let reader = ShmRing::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let mut big = vec![0u8; 3 * CAPACITY];
        // The peer claims more bytes than the ring holds, from the middle of the ring.
        reader
            .read_count()
            .store(CAPACITY as u64 / 2, Ordering::SeqCst);
        writer
            .written()
            .store(10 * CAPACITY as u64, Ordering::SeqCst);
        assert_eq!(
            reader.read(&mut big).0,
            CAPACITY,
            "at most one ring's worth"
        );
        // A reader ahead of the writer (impossible for a sane peer) leaves no room.
        reader
            .read_count()
            .store(20 * CAPACITY as u64, Ordering::SeqCst);
        assert_eq!(writer.write(&big).0, 0);
        assert!(!writer.writer_sleeps(), "no room: the writer may sleep");
    }

    #[test]
    fn a_file_that_is_not_a_ring_is_refused() {
        let path = std::env::temp_dir().join(format!("not-a-ring-{}", std::process::id()));
        std::fs::write(&path, b"short").unwrap();
        let error = ShmRing::open(&path).err().unwrap().to_string();
        assert!(error.contains("not a ring's"), "{error}");
        let _ = std::fs::remove_file(&path);
    }
}
