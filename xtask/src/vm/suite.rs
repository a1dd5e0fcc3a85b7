//! The VM phase of `cargo xtask test`: end-to-end tests run inside the 6.1 guest.
