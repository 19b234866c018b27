//! Large buffers for the trainer. Activations, gradients and optimizer state are hundreds of MB
//! each; backing them with transparent huge pages cuts TLB misses in GEMM packing and in the
//! streaming elementwise kernels, and keeping freed memory in the heap stops per-call scratch
//! buffers from being unmapped and faulted in again on every kernel call.

/// A zeroed `Vec<f32>` of `n` elements; on Linux, buffers of 2 MiB or more ask for huge pages
/// before their pages are first touched.
pub fn zeroed(n: usize) -> Vec<f32> {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        if n * 4 >= HUGE {
            let mut v: Vec<f32> = Vec::with_capacity(n);
            let start = v.as_mut_ptr() as usize;
            let aligned = start.next_multiple_of(HUGE);
            let end = (start + n * 4) & !(HUGE - 1);
            if end > aligned {
                // SAFETY: [aligned, end) lies inside the allocation just made; madvise only
                // changes how its (still untouched) pages are backed. Failure is harmless.
                unsafe {
                    libc::madvise(aligned as *mut libc::c_void, end - aligned, libc::MADV_HUGEPAGE);
                }
            }
            v.resize(n, 0.0);
            return v;
        }
    }
    vec![0.0; n]
}

/// Tunes the process allocator once, before the first large allocation: glibc otherwise returns
/// every freed block above 128 KiB to the kernel, so per-call scratch (GEMM packing, attention
/// tiles) is unmapped and page-faulted back in, with TLB shootdowns across threads, every call.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator thresholds; called before worker threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
