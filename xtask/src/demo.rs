//! `cargo xtask demo`: builds everything and runs the vm-tests `demo` binary, which builds a lab
//! of network namespaces, attaches the NAT, pushes traffic, prints the NAT table and counters,
//! and tears the lab down.

use anyhow::{bail, Result};

use crate::build::{build_all, nat_ctl_path};
use crate::cmd::{is_root, target_dir, Cmd};
use crate::setup;

pub fn run(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!(
            "the demo needs root (it creates network namespaces and attaches eBPF programs); \
             run `cargo xtask demo` as root"
        );
    }
    setup::ensure(setup::ALL)?;
    build_all()?;
    let demo = target_dir().join("release").join("demo");
    if !demo.is_file() {
        bail!(
            "{} was not built: the vm-tests crate has no `demo` binary",
            demo.display()
        );
    }
    Cmd::new(&demo).env("NAT_CTL", nat_ctl_path()).args(args).run()
}
