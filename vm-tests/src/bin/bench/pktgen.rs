//! The kernel's packet generator, `pktgen` (net/core/pktgen.c), driven through its /proc files.
//!
//! pktgen lives per network namespace: after `modprobe pktgen` every namespace has its own
//! `/proc/net/pktgen/` with a control file `pgctrl`, one `kpktgend_N` file per CPU (each a kernel
//! thread bound to that CPU) and one file per device added to a thread. A device is configured by
//! writing one command per write(2) to its file (`count 1000`, `dst 10.0.0.1`, ...); writing
//! `start` to `pgctrl` sends on every configured device of the namespace and returns once all of
//! them have sent their `count`. The device file then shows the run's result:
//!
//! ```text
//! Result: OK: 1234567(c1200000+d34567) usec, 50000 (60byte,0frags)
//!   40500pps 19Mb/sec (19440000bps) errors: 0
//! ```
//!
//! pktgen transmits with the device's own `ndo_start_xmit`, bypassing the qdisc: on a veth each
//! packet goes straight to the peer's receive path. Our process reaches a namespace's files
//! through `/proc/thread-self/net`, from a thread that joined the namespace (`/proc/net` follows
//! the main thread's namespace, not the calling thread's).
//!
//! The host's kernel has no pktgen; Debian's 6.1 kernel in the VM has (see `vm_forwarding`).

use std::net::Ipv4Addr;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vm_tests::netns::Netns;

use crate::frame::Mac;

/// pktgen's directory as seen by a thread in the namespace.
const PROC_DIR: &str = "/proc/thread-self/net/pktgen";
/// pktgen's directory for the initial namespace (to tell whether the module is loaded).
pub const HOST_PROC_DIR: &str = "/proc/net/pktgen";
/// The control file.
const PGCTRL: &str = "pgctrl";
/// Frame length without the FCS: the 64-byte minimum Ethernet frame, as the host benchmark's
/// generator sends (pktgen adds its own header after UDP's; 60 bytes leave room for it).
pub const PKT_SIZE: u32 = 60;
/// How often `add_device` is retried while the thread still holds the device of an earlier
/// `rem_device_all` (the kernel thread acts on that command within about 125 ms).
const ADD_RETRIES: u32 = 40;
/// Pause between those retries.
const ADD_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// One packet stream: UDP from `src`, ports `src_ports`, to `dst`, ports `dst_ports`, as frames
/// addressed to `dst_mac`. Ports cycle in order through each half-open range, one step per
/// packet (pktgen's default without the `UDPSRC_RND`/`UDPDST_RND` flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stream {
    /// Next hop's MAC.
    pub dst_mac: Mac,
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Source ports, half-open, not empty.
    pub src_ports: Range<u16>,
    /// Destination ports, half-open, not empty.
    pub dst_ports: Range<u16>,
    /// Packets to send.
    pub count: u64,
}

/// The `min`/`max` pair pktgen needs for the half-open `ports`. pktgen cycles `min, min+1, ...,
/// max-1` when `min < max` (its `max` is exclusive) and keeps `min` when `min == max`.
fn port_bounds(ports: &Range<u16>) -> Result<(u16, u16)> {
    match ports.len() {
        0 => bail!("empty port range {ports:?}"),
        1 => Ok((ports.start, ports.start)),
        _ => Ok((ports.start, ports.end)),
    }
}

fn mac_text(m: &Mac) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

impl Stream {
    /// The device commands that configure this stream, in order.
    pub fn commands(&self) -> Result<Vec<String>> {
        if self.count == 0 {
            // pktgen reads a count of 0 as "send forever".
            bail!("a pktgen stream needs a packet count above 0");
        }
        let (sp_min, sp_max) = port_bounds(&self.src_ports)?;
        let (dp_min, dp_max) = port_bounds(&self.dst_ports)?;
        Ok(vec![
            format!("count {}", self.count),
            // A fresh skb per packet: only then do the ports change from packet to packet
            // (and a veth does not take shared skbs anyway).
            "clone_skb 0".into(),
            format!("pkt_size {PKT_SIZE}"),
            // No pause between packets: as fast as the path takes them.
            "delay 0".into(),
            // No timestamp in pktgen's payload header: one clock read less per packet.
            "flag NO_TIMESTAMP".into(),
            format!("dst_mac {}", mac_text(&self.dst_mac)),
            format!("src_min {}", self.src),
            format!("src_max {}", self.src),
            format!("dst {}", self.dst),
            format!("udp_src_min {sp_min}"),
            format!("udp_src_max {sp_max}"),
            format!("udp_dst_min {dp_min}"),
            format!("udp_dst_max {dp_max}"),
        ])
    }
}

/// The outcome of one run, from the device file's `Result:` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// From the first packet to the stop, microseconds.
    pub elapsed_us: u64,
    /// Packets the device accepted (`sofar`).
    pub sent: u64,
    /// pktgen's own rate: sent / elapsed.
    pub pps: u64,
    /// Transmit errors.
    pub errors: u64,
}

/// The number at the start of `s` (after leading spaces), and the rest.
fn leading_number(s: &str) -> Option<(u64, &str)> {
    let s = s.trim_start();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    Some((s[..end].parse().ok()?, &s[end..]))
}

/// Parses a device file's text: its `Result:` line must say `OK:` with the run's figures (any
/// other result, such as `Idle` before a run or an error message, is an error naming it).
pub fn parse_result(device_file: &str) -> Result<Outcome> {
    let at = device_file
        .find("Result: ")
        .context("no Result: line in pktgen's device file")?;
    let result = &device_file[at + "Result: ".len()..];
    let first_line = result.lines().next().unwrap_or("").trim();
    let bad = || format!("unexpected pktgen result {first_line:?}");
    let Some(ok) = result.strip_prefix("OK: ") else {
        bail!("pktgen did not run: {first_line}");
    };
    // "1234(c1200+d34) usec, 50000 (60byte,0frags)\n  40500pps 19Mb/sec (...) errors: 0"
    let (elapsed_us, rest) = leading_number(ok).with_context(bad)?;
    let rest = rest.split_once(" usec, ").map(|(_, r)| r).with_context(bad)?;
    let (sent, rest) = leading_number(rest).with_context(bad)?;
    let rest = rest.split_once('\n').map(|(_, r)| r).with_context(bad)?;
    let (pps, rest) = leading_number(rest).with_context(bad)?;
    if !rest.starts_with("pps") {
        bail!(bad());
    }
    let errors = rest
        .split_once("errors: ")
        .and_then(|(_, r)| leading_number(r))
        .map(|(n, _)| n)
        .with_context(bad)?;
    Ok(Outcome {
        elapsed_us,
        sent,
        pps,
        errors,
    })
}

fn path(file: &str) -> PathBuf {
    PathBuf::from(PROC_DIR).join(file)
}

/// One command as written: with the newline `echo` would add. pgctrl drops the last byte of a
/// write unseen (it expects that newline), and the other files skip it.
fn line(cmd: &str) -> String {
    format!("{cmd}\n")
}

/// Writes one command to a pktgen file (one write(2), as pktgen parses each write on its own).
fn command(file: &str, cmd: &str) -> Result<()> {
    std::fs::write(path(file), line(cmd)).with_context(|| format!("pktgen: `{cmd}` to {file} failed"))
}

fn read(file: &str) -> Result<String> {
    std::fs::read_to_string(path(file)).with_context(|| format!("cannot read pktgen's {file}"))
}

/// Loads the module (once per boot; harmless when it is loaded) and checks it is there.
pub fn load_module() -> Result<()> {
    let out = vm_tests::proc::run(
        "modprobe pktgen",
        vm_tests::proc::command("modprobe", &["pktgen"]),
        vm_tests::netns::SETUP_TIMEOUT,
    )?;
    if !std::path::Path::new(HOST_PROC_DIR).join(PGCTRL).exists() {
        bail!(
            "this kernel has no pktgen ({}); the pktgen phase runs in the VM: \
             `cargo xtask bench -- --vm-only`",
            out.stderr.trim()
        );
    }
    Ok(())
}

/// A device of a namespace added to the pktgen thread of one CPU.
pub struct Generator<'a> {
    ns: &'a Netns,
    iface: String,
}

impl<'a> Generator<'a> {
    /// Hands `iface` of `ns` to the pktgen thread of `cpu` (and nothing else to any thread of
    /// that namespace, so `start` sends on this device only).
    pub fn add(ns: &'a Netns, iface: &str, cpu: usize) -> Result<Generator<'a>> {
        let threads: Vec<String> = (0..std::thread::available_parallelism().map_or(1, |n| n.get()))
            .map(|c| format!("kpktgend_{c}"))
            .collect();
        let thread = format!("kpktgend_{cpu}");
        ns.enter(|| {
            for t in &threads {
                command(t, "rem_device_all")?;
            }
            // The threads drop their devices asynchronously: while one still has this device,
            // adding it fails with EBUSY.
            let add = format!("add_device {iface}");
            for _ in 0..ADD_RETRIES {
                match std::fs::write(path(&thread), line(&add)) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => std::thread::sleep(ADD_RETRY_PAUSE),
                    r => return r.with_context(|| format!("pktgen: `{add}` to {thread} failed")),
                }
            }
            bail!("pktgen still had {iface} after {ADD_RETRIES} tries")
        })
        .with_context(|| format!("cannot add {iface} of {} to pktgen", ns.name()))?;
        Ok(Generator {
            ns,
            iface: iface.to_string(),
        })
    }

    /// Sends `stream` and waits for the end; after `timeout` the run is stopped and reported as
    /// an error (pktgen itself never gives up).
    pub fn run(&self, stream: &Stream, timeout: Duration) -> Result<Outcome> {
        let commands = stream.commands()?;
        let iface = self.iface.as_str();
        self.ns.enter(|| {
            for c in &commands {
                command(iface, c)?;
            }
            let (done_tx, done_rx) = mpsc::channel::<()>();
            // The watchdog runs in this namespace too: threads inherit it from their creator.
            let watchdog = std::thread::spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
                    let _ = command(PGCTRL, "stop");
                    return true;
                }
                false
            });
            // Blocks until every device of the namespace has sent its count (or is stopped).
            let started = command(PGCTRL, "start");
            let _ = done_tx.send(());
            let stopped = watchdog.join().unwrap_or(false);
            started?;
            if stopped {
                bail!(
                    "pktgen on {iface} did not send {} packets within {timeout:?}",
                    stream.count
                );
            }
            parse_result(&read(iface)?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device file after a run, as 6.1 prints it (abridged to the lines around the result).
    const AFTER_RUN: &str = "Params: count 50000  min_pkt_size: 60  max_pkt_size: 60\n\
         \x20    frags: 0  delay: 0  clone_skb: 0  ifname: eth0\n\
         Current:\n\
         \x20    pkts-sofar: 50000  errors: 0\n\
         \x20    started: 1042331us  stopped: 2276120us idle: 3us\n\
         Result: OK: 1233789(c1233786+d3) usec, 50000 (60byte,0frags)\n\
         \x20 40525pps 19Mb/sec (19452000bps) errors: 0\n";

    #[test]
    fn parses_a_finished_run() {
        assert_eq!(
            parse_result(AFTER_RUN).unwrap(),
            Outcome {
                elapsed_us: 1_233_789,
                sent: 50_000,
                pps: 40_525,
                errors: 0
            }
        );
    }

    #[test]
    fn parses_errors_and_a_result_without_trailing_newline() {
        let text = "Result: OK: 2000000(c1999990+d10) usec, 1000 (60byte,0frags)\n  500pps 0Mb/sec (240000bps) errors: 17";
        let o = parse_result(text).unwrap();
        assert_eq!(
            (o.elapsed_us, o.sent, o.pps, o.errors),
            (2_000_000, 1_000, 500, 17)
        );
    }

    #[test]
    fn a_result_that_is_not_ok_is_an_error_naming_it() {
        let e = parse_result("Params: ...\nResult: Idle\n").unwrap_err();
        assert!(format!("{e}").contains("Idle"), "{e}");
        let e = parse_result("Result: ERROR: no such netdevice\n").unwrap_err();
        assert!(format!("{e}").contains("no such netdevice"), "{e}");
        assert!(parse_result("Params: count 1\n").is_err());
        // Truncated figures are refused, not read as zeros.
        assert!(parse_result("Result: OK: 1234(c1+d2) usec, \n").is_err());
        assert!(parse_result("Result: OK: 1234(c1+d2) usec, 10 (60byte,0frags)\n  fastpps").is_err());
    }

    fn stream(src_ports: Range<u16>, dst_ports: Range<u16>) -> Stream {
        Stream {
            dst_mac: [0x02, 0, 0, 0, 0xab, 0x01],
            src: Ipv4Addr::new(10, 0, 0, 2),
            dst: Ipv4Addr::new(198, 51, 100, 1),
            src_ports,
            dst_ports,
            count: 5_000,
        }
    }

    #[test]
    fn commands_configure_the_whole_stream() {
        let c = stream(60_000..60_016, 4_000..4_001).commands().unwrap();
        for want in [
            "count 5000",
            "clone_skb 0",
            "pkt_size 60",
            "delay 0",
            "dst_mac 02:00:00:00:ab:01",
            "src_min 10.0.0.2",
            "src_max 10.0.0.2",
            "dst 198.51.100.1",
            // pktgen's max is exclusive: 16 ports.
            "udp_src_min 60000",
            "udp_src_max 60016",
            // One port: min == max keeps it fixed.
            "udp_dst_min 4000",
            "udp_dst_max 4000",
        ] {
            assert!(c.iter().any(|x| x == want), "missing {want:?} in {c:?}");
        }
    }

    #[test]
    fn empty_ranges_and_endless_counts_are_refused() {
        assert!(stream(1..1, 4_000..4_001).commands().is_err());
        let mut s = stream(1..2, 4_000..4_001);
        s.count = 0;
        assert!(s.commands().is_err());
    }
}
