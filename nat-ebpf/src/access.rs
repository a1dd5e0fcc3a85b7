//! Bounds-checked access to packet memory, in the form the verifier accepts.

use core::mem::size_of;

/// A pointer to a `T` at `offset` bytes into the packet, if the whole `T` lies before `end`.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, offset: usize) -> Option<*mut T> {
    let at = start + offset;
    if at + size_of::<T>() > end {
        return None;
    }
    Some(at as *mut T)
}

/// Reads a `T` at `offset` (unaligned), if it lies inside the packet.
#[inline(always)]
pub fn read_at<T: Copy>(start: usize, end: usize, offset: usize) -> Option<T> {
    // SAFETY: `ptr_at` checked that the `T` lies inside the packet.
    ptr_at::<T>(start, end, offset).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

/// Writes a `T` at `offset` (unaligned), if it lies inside the packet.
#[inline(always)]
pub fn write_at<T: Copy>(start: usize, end: usize, offset: usize, value: T) -> Option<()> {
    // SAFETY: `ptr_at` checked that the `T` lies inside the packet.
    ptr_at::<T>(start, end, offset).map(|p| unsafe { core::ptr::write_unaligned(p, value) })
}
