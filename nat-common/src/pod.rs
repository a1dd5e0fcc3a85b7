//! `aya::Pod` for the map types, so the controller can read and write them (feature `user`).

use crate::{
    bench::{GenClock, GenParams},
    maps::{Notice, ParkedFragment, SessionUsageKey},
    BindingKey, BindingValue, ExternalKey, ExternalValue, FragmentKey, FragmentValue, NatConfig, SessionKey,
    SessionValue,
};

// SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers with explicit padding fields,
// so every bit pattern is valid and no byte is uninitialised.
unsafe impl aya::Pod for NatConfig {}
unsafe impl aya::Pod for BindingKey {}
unsafe impl aya::Pod for BindingValue {}
unsafe impl aya::Pod for ExternalKey {}
unsafe impl aya::Pod for ExternalValue {}
unsafe impl aya::Pod for SessionKey {}
unsafe impl aya::Pod for SessionValue {}
unsafe impl aya::Pod for FragmentKey {}
unsafe impl aya::Pod for FragmentValue {}
unsafe impl aya::Pod for ParkedFragment {}
unsafe impl aya::Pod for Notice {}
unsafe impl aya::Pod for SessionUsageKey {}
unsafe impl aya::Pod for GenParams {}
unsafe impl aya::Pod for GenClock {}
