//! Bounds-checked access to packet memory, in the form the verifier accepts.
//!
//! The verifier tracks the checked range per packet pointer. A pointer recomputed from the
//! packet start plus a variable offset (an IP header length) is a new pointer with no range,
//! even when the same bytes were checked before. So callers compute each variable-offset base
//! once (transport header, embedded header) and address everything at constant offsets from
//! it: `base` below is such a pointer, never `data + variable`.

use core::mem::size_of;

/// A pointer to a `T` at `offset` bytes past `base`, if the whole `T` lies before `end`.
#[inline(always)]
pub fn ptr_at<T>(base: usize, end: usize, offset: usize) -> Option<*mut T> {
    let at = base + offset;
    if at + size_of::<T>() > end {
        return None;
    }
    Some(at as *mut T)
}

/// Reads a `T` at `base + offset` (unaligned), if it lies inside the packet.
#[inline(always)]
pub fn read_at<T: Copy>(base: usize, end: usize, offset: usize) -> Option<T> {
    // SAFETY: `ptr_at` checked that the `T` lies inside the packet.
    ptr_at::<T>(base, end, offset).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

/// Writes a `T` at `base + offset` (unaligned), if it lies inside the packet.
#[inline(always)]
pub fn write_at<T: Copy>(base: usize, end: usize, offset: usize, value: T) -> Option<()> {
    // SAFETY: `ptr_at` checked that the `T` lies inside the packet.
    ptr_at::<T>(base, end, offset).map(|p| unsafe { core::ptr::write_unaligned(p, value) })
}

/// Reads the byte at `base + offset`. The bounds check covers two bytes: a one-byte check
/// compiles to `at >= end`, from which the verifier derives no readable range; every byte read
/// here is followed by more header, so asking for one byte more is free.
#[inline(always)]
pub fn read_u8_at(base: usize, end: usize, offset: usize) -> Option<u8> {
    read_at::<[u8; 2]>(base, end, offset).map(|b| b[0])
}
