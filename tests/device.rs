//! Host memory policy: after `retain_freed_memory`, large buffers come from the heap instead of a
//! mapping each, and the environment can opt out. Runs without libtest's harness because glibc
//! applies the policy to the main thread's arena, where the networks run; libtest would move the
//! check onto a worker thread with an arena of its own.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    use mcld::device::retain_freed_memory;

    const BIG: usize = 96 << 20;
    fn mapped_bytes() -> usize {
        // SAFETY: mallinfo2 only reads allocator statistics.
        unsafe { libc::mallinfo2() }.hblkhd
    }
    fn mapped_by_big_buffer() -> usize {
        let before = mapped_bytes();
        let v = std::hint::black_box(vec![1u8; BIG]);
        let during = mapped_bytes();
        assert_eq!(v[BIG - 1], 1);
        during.saturating_sub(before)
    }

    // glibc's default maps a buffer this size on its own: the check below can fail.
    assert!(
        mapped_by_big_buffer() >= BIG,
        "default glibc should map a 96 MiB buffer"
    );

    std::env::set_var("MALLOC_MMAP_MAX_", "65536");
    assert!(
        !retain_freed_memory(),
        "an explicit MALLOC_MMAP_MAX_ must win"
    );
    assert!(mapped_by_big_buffer() >= BIG);
    std::env::remove_var("MALLOC_MMAP_MAX_");

    assert!(retain_freed_memory());
    assert_eq!(
        mapped_by_big_buffer(),
        0,
        "a 96 MiB buffer was still mapped"
    );
    assert_eq!(
        mapped_by_big_buffer(),
        0,
        "a second 96 MiB buffer was mapped"
    );
    println!("device: large buffers stay on the heap ... ok");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {}
