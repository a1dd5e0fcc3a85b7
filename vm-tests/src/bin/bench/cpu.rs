//! Where things run. The generator, and with it the whole forwarding path, runs on the last
//! CPU; the NAT's controller is kept off it, so its expiry sweep (a walk over every binding)
//! never runs on the CPU being measured.

use anyhow::{Context, Result};

/// CPU of the generator and of the per-packet test runs: the last one.
pub fn generator_cpu() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() - 1)
        .unwrap_or(0)
}

/// CPU for everything else we start (nat-ctl): the first one.
pub const HOUSEKEEPING_CPU: usize = 0;

fn set_affinity(tid: libc::pid_t, cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity are plain libc calls
    // on it and on a thread id.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Pins the calling thread to `cpu`.
pub fn pin_thread(cpu: usize) -> Result<()> {
    set_affinity(0, cpu).with_context(|| format!("cannot pin to CPU {cpu}"))
}

/// Pins every thread of our child process `pid` to `cpu` (affinity is per thread, and
/// threads started later inherit it from the one that starts them).
pub fn pin_process(pid: u32, cpu: usize) -> Result<()> {
    let tasks = format!("/proc/{pid}/task");
    for entry in std::fs::read_dir(&tasks).with_context(|| format!("cannot list {tasks}"))? {
        let tid: libc::pid_t = entry?
            .file_name()
            .to_string_lossy()
            .parse()
            .with_context(|| format!("odd entry in {tasks}"))?;
        match set_affinity(tid, cpu) {
            Ok(()) => {}
            // The thread ended meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot pin thread {tid} of {pid} to CPU {cpu}"))
            }
        }
    }
    Ok(())
}
