//! The VM phase's part of BENCHMARKS.md: one section between two marker comments, so the host
//! phases (which rewrite the whole file) keep it, and the VM phase replaces only it.
//!
//! The section is made in the guest (`--only pktgen --section-out FILE`, a file on the VM's
//! writable share) and merged into the report on the host (`--merge-section FILE --out
//! BENCHMARKS.md`); a host run carries an existing section over into the file it writes.

use std::fmt::Write;
use std::ops::Range;

use crate::contender::Contender;
use crate::forwarding::{Direction, Measurement, Results};
use crate::report::Run;
use crate::stats::{median, range};

/// First line of the section (a comment: invisible in the rendered report).
pub const BEGIN: &str =
    "<!-- BEGIN vm-pktgen: written by the VM phase of `cargo xtask bench`; the host phases keep it -->";
/// Last line of the section.
pub const END: &str = "<!-- END vm-pktgen -->";

/// Ratios the section lists: (numerator, denominator).
const RATIOS: [(Contender, Contender); 8] = [
    (Contender::NatFastPath, Contender::Nftables),
    (Contender::NatFastPath, Contender::NftFlowtable),
    (Contender::NatFastPath, Contender::Kernel),
    (Contender::Nat, Contender::Nftables),
    (Contender::Nat, Contender::NftFlowtable),
    (Contender::Nat, Contender::Kernel),
    (Contender::Nftables, Contender::Kernel),
    (Contender::NftFlowtable, Contender::Kernel),
];

/// Byte range of the section in `doc`: from the start of its BEGIN line to the end of its END
/// line (its newline included). A BEGIN without an END (a cut-off file) runs to the end.
fn find(doc: &str) -> Option<Range<usize>> {
    let start = doc.find(BEGIN)?;
    let end = match doc[start..].find(END) {
        Some(at) => {
            let after = start + at + END.len();
            after + usize::from(doc[after..].starts_with('\n'))
        }
        None => doc.len(),
    };
    Some(start..end)
}

/// The section in `doc`, if there is one.
pub fn extract(doc: &str) -> Option<&str> {
    find(doc).map(|r| &doc[r])
}

/// `doc` with `section` in place of its section, or appended (after a blank line) if it has none.
pub fn merge(doc: &str, section: &str) -> String {
    let section = section.trim_end_matches('\n');
    match find(doc) {
        Some(r) => format!("{}{section}\n{}", &doc[..r.start], &doc[r.end..]),
        None if doc.trim().is_empty() => format!("{section}\n"),
        None => format!("{}\n\n{section}\n", doc.trim_end_matches('\n')),
    }
}

fn kpps(pps: f64) -> String {
    format!("{:.1}", pps / 1e3)
}

/// Reasons why points have no numbers, numbered in order of first appearance: the tables
/// show the number, the list under them the reason (often a long one, the same in every
/// direction).
#[derive(Default)]
struct Notes(Vec<String>);

impl Notes {
    fn mark(&mut self, why: &str) -> String {
        let why = why.replace('|', "/");
        let n = match self.0.iter().position(|w| *w == why) {
            Some(i) => i + 1,
            None => {
                self.0.push(why);
                self.0.len()
            }
        };
        format!("none [{n}]")
    }

    fn write(&self, md: &mut String) {
        if self.0.is_empty() {
            return;
        }
        md.push('\n');
        for (i, why) in self.0.iter().enumerate() {
            let _ = writeln!(md, "- [{}] {why}", i + 1);
        }
    }
}

fn cell(m: Option<&Measurement>, notes: &mut Notes) -> String {
    let Some(m) = m else {
        return "not run".into();
    };
    if let Some(why) = &m.unavailable {
        return notes.mark(why);
    }
    match (median(&m.pps), range(&m.pps)) {
        (Some(med), Some((lo, hi))) => format!("{} ({}–{})", kpps(med), kpps(lo), kpps(hi)),
        _ => "no samples".into(),
    }
}

fn point(r: &Results, c: Contender, d: Direction) -> Option<&Measurement> {
    r.points.get(&(c, d))
}

fn ratio(r: &Results, num: Contender, den: Contender, d: Direction) -> String {
    let v = point(r, num, d).and_then(|m| m.median_pps());
    let w = point(r, den, d).and_then(|m| m.median_pps());
    match (v, w) {
        (Some(v), Some(w)) if w > 0.0 => format!("{:.2}×", v / w),
        _ => "–".into(),
    }
}

/// µs per packet beyond the floor: the time the router's work (past its ingress hook) and the
/// far veth add to each packet.
fn router_us(pps: f64, floor_pps: f64) -> f64 {
    1e6 / pps - 1e6 / floor_pps
}

/// The median rates as time per packet beyond pktgen's floor, and their ratios to nftables:
/// the generator's own (large, equal) share no longer pulls every ratio towards 1.
fn router_time_table(r: &Results, floor: f64, md: &mut String) {
    let _ = writeln!(
        md,
        "\nTime per packet beyond the floor (µs = 1/rate − 1/floor, from the medians), and its \
         ratio to nftables masquerade's; the generator's and the veth's share, the same for \
         every contender, is taken out (lower is better):\n"
    );
    let _ = writeln!(
        md,
        "| contender | {} |\n|---|---|---|---|",
        Direction::ALL.map(|d| d.label()).join(" | ")
    );
    for c in Contender::IN_VM {
        let cells: Vec<String> = Direction::ALL
            .iter()
            .map(|&d| {
                let us = |c| {
                    point(r, c, d)
                        .and_then(|m| m.median_pps())
                        .map(|p| router_us(p, floor))
                };
                match (us(c), us(Contender::Nftables)) {
                    (Some(t), _) if t <= 0.0 => "≤ 0 (within noise)".into(),
                    (Some(t), Some(n)) if n > 0.0 => format!("{t:.1} ({:.2}× nft)", t / n),
                    (Some(t), _) => format!("{t:.1}"),
                    (None, _) => "–".into(),
                }
            })
            .collect();
        let _ = writeln!(md, "| {} | {} |", c.label(), cells.join(" | "));
    }
}

fn short(c: Contender) -> &'static str {
    match c {
        Contender::Kernel => "kernel forwarding",
        Contender::Nftables => "nftables masquerade",
        Contender::Nat => "our NAT",
        Contender::NatFastPath => "our NAT + fast path",
        Contender::NftFlowtable => "nftables flowtable",
        Contender::XdpForward => "bare XDP forwarder",
    }
}

/// The section for `run` (which must hold pktgen results), markers included.
pub fn section(run: &Run, settings: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "{BEGIN}");
    let _ = writeln!(md, "## Kernel 6.1 in a VM, driven by pktgen\n");
    if run.smoke {
        let _ = writeln!(
            md,
            "**Smoke run: every path ran only briefly; the numbers are not meaningful.**\n"
        );
    }
    let m = &run.machine;
    let _ = writeln!(
        md,
        "Produced by `{}` (the VM phase) on {}, in {:.0} s inside the VM, from source {}.\n\n\
         - Guest: kernel {} (Debian 12's stock kernel package), booted in qemu with TCG emulation \
         (KVM cannot run it on these machines), {} vCPUs, {} MiB RAM; the host's userspace mounted \
         read-only.\n\
         - **Absolute rates mean little here.** Under TCG qemu translates every guest instruction, \
         so rates are tens of times below the host's and move with the host's load; they are \
         not comparable with the host sections above. The contenders were measured alternately in \
         one boot, so the *ratios* between them are what this section is for.\n",
        run.command,
        m.date,
        run.duration.as_secs_f64(),
        m.revision,
        m.kernel,
        m.cpus,
        m.memory_mib,
    );
    let Some(r) = &run.pktgen else {
        let _ = writeln!(md, "No pktgen results in this run.\n{END}");
        return md;
    };
    let dirs = Direction::ALL;
    let header = |md: &mut String, first: &str| {
        let _ = writeln!(
            md,
            "| {first} | {} |\n|---|---|---|---|",
            dirs.map(|d| d.label()).join(" | ")
        );
    };

    let _ = writeln!(
        md,
        "Ratios of the median rates (– where a contender has no numbers):\n"
    );
    header(&mut md, "ratio");
    for (num, den) in RATIOS {
        let cells: Vec<String> = dirs.iter().map(|&d| ratio(r, num, den, d)).collect();
        let _ = writeln!(md, "| {} / {} | {} |", short(num), short(den), cells.join(" | "));
    }

    let _ = writeln!(
        md,
        "\nMedian delivered kpps (thousand packets per second) over the rounds, min–max in brackets:\n"
    );
    header(&mut md, "contender");
    let mut notes = Notes::default();
    for c in Contender::IN_VM {
        let cells: Vec<String> = dirs.iter().map(|&d| cell(point(r, c, d), &mut notes)).collect();
        let _ = writeln!(md, "| {} | {} |", c.label(), cells.join(" | "));
    }
    let floor = median(&r.ceiling_pps);
    if let Some(f) = floor {
        let _ = writeln!(
            md,
            "| pktgen floor: dropped at the router's first interface (tc ingress) | {} | | |",
            kpps(f)
        );
    }
    notes.write(&mut md);
    if let Some(f) = floor {
        router_time_table(r, f, &mut md);
    }

    let _ = writeln!(
        md,
        "\nShare of delivered packets the router's kernel forwarded (`ForwDatagrams`; 0% = all on an XDP path):\n"
    );
    header(&mut md, "contender");
    for c in Contender::IN_VM {
        let cells: Vec<String> = dirs
            .iter()
            .map(|&d| match point(r, c, d) {
                Some(m) if m.unavailable.is_none() => median(&m.kernel_share)
                    .map(|s| format!("{:.0}%", s * 100.0))
                    .unwrap_or_default(),
                _ => "–".into(),
            })
            .collect();
        let _ = writeln!(md, "| {} | {} |", c.label(), cells.join(" | "));
    }
    md.push_str(METHOD);
    let _ = writeln!(md, "\nSettings of this run: `{settings}`\n{END}");
    md
}

const METHOD: &str = "
How (differences from the host comparison's Method; everything else is the same: topology, \
sinks, contenders, flows, fresh topology per contender and round, rotated order):

- **Contenders**: all of the host comparison's but the bare XDP forwarder (its limit is what our \
fast path is held to, and the fast path stays off on 6.1). nftables with a flowtable is measured \
here in any case: Debian's 6.1 has flowtables.

- **Generator**: the kernel's `pktgen` (`modprobe pktgen`; the host's kernel has none), the kernel \
thread of the last vCPU, on the end host's veth in `src` (outbound) or `dst` (inbound). It sends \
60-byte UDP packets (64-byte frames, no UDP checksum) through the veth's transmit function, a fresh \
skb per packet, with the ports stepping through the flows. Each point is a fixed number of \
packets (see Settings), after a warm-up of 1 000 packets of the same kind (the new-flow warm-up \
on other ports): it creates the established flows, and makes qemu translate the path's code \
before it is timed.
- **Rate** = packets counted by the far sink / pktgen's elapsed time for the point. pktgen's \
transmit runs the router's receive processing in the same softirq on the same vCPU, so the rate \
is that of the whole path, generator included. pktgen builds a fresh skb for every packet (a \
veth cannot take shared ones), a cost the host's generator does not have, so here the generator \
takes a large share of every packet's time and the rate ratios lie closer to 1 than the host's. \
The *floor* row measures that share: pktgen into the router with a tc `matchall` drop on its \
first interface's ingress (once per round, with the kernel-forwarding topology); the time table \
subtracts it.
- A contender that cannot start on this kernel (for example `nat-ctl attach` refused by its \
verifier) shows why instead of numbers; the others are measured all the same.
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Machine;

    const HOST: &str = "# Benchmarks\n\nhost tables\n\n## Caveats\n\n- one\n";

    #[test]
    fn merge_appends_then_replaces_only_the_section() {
        let s1 = format!("{BEGIN}\n## VM\nfirst\n{END}\n");
        let once = merge(HOST, &s1);
        assert!(once.starts_with(HOST.trim_end()));
        assert!(once.ends_with(&s1));
        assert_eq!(extract(&once), Some(s1.as_str()));
        let s2 = format!("{BEGIN}\n## VM\nsecond\n{END}");
        let twice = merge(&once, &s2);
        assert_eq!(twice.matches(BEGIN).count(), 1);
        assert!(twice.contains("second") && !twice.contains("first"));
        assert!(twice.starts_with(HOST.trim_end()));
    }

    #[test]
    fn a_host_rewrite_carries_the_section_over() {
        let old = merge(HOST, &format!("{BEGIN}\nvm numbers\n{END}\n"));
        let new_host = "# Benchmarks\n\nnew host tables\n";
        let written = match extract(&old) {
            Some(s) => merge(new_host, s),
            None => new_host.to_string(),
        };
        assert!(written.contains("new host tables") && written.contains("vm numbers"));
        assert!(!written.contains("\nhost tables"));
    }

    #[test]
    fn text_after_the_section_stays_and_a_cut_off_section_is_replaced() {
        let doc = format!("head\n{BEGIN}\nold\n{END}\ntail\n");
        let merged = merge(&doc, &format!("{BEGIN}\nnew\n{END}"));
        assert_eq!(merged, format!("head\n{BEGIN}\nnew\n{END}\ntail\n"));
        let cut = format!("head\n{BEGIN}\nold, no end");
        assert_eq!(
            merge(&cut, &format!("{BEGIN}\nnew\n{END}")),
            format!("head\n{BEGIN}\nnew\n{END}\n")
        );
        assert_eq!(merge("", "x"), "x\n");
    }

    fn measured(pps: &[f64]) -> Measurement {
        Measurement {
            pps: pps.to_vec(),
            kernel_share: vec![1.0; pps.len()],
            unavailable: None,
        }
    }

    #[test]
    fn section_shows_ratios_rates_and_why_a_contender_has_none() {
        let mut r = Results::default();
        let d = Direction::OutboundEstablished;
        r.points
            .insert((Contender::Kernel, d), measured(&[40_000.0, 44_000.0, 42_000.0]));
        r.points.insert((Contender::Nftables, d), measured(&[30_000.0]));
        r.points.insert((Contender::Nat, d), measured(&[36_000.0]));
        r.points.insert(
            (Contender::NatFastPath, d),
            Measurement {
                unavailable: Some("failed to attach: R9 invalid mem access | scalar".into()),
                ..Measurement::default()
            },
        );
        let machine = Machine {
            cpus: 2,
            kernel: "6.1.0-57-amd64".into(),
            cpu_model: "QEMU TCG".into(),
            memory_mib: 3_900,
            date: "2026-12-03 12:00 UTC".into(),
            revision: "abc1234".into(),
        };
        let mut run = Run::new(machine, "cargo xtask bench -- --vm-only".into(), false);
        run.pktgen = Some(r);
        run.pktgen.as_mut().unwrap().ceiling_pps = vec![60_000.0];
        let s = section(&run, "Settings { rounds: 3 }");
        // 1/30k − 1/60k s = 16.7 µs for nftables, 1/36k − 1/60k = 11.1 µs for ours.
        assert!(
            s.contains("| our NAT (default attach) | 11.1 (0.67× nft) |"),
            "{s}"
        );
        assert!(s.contains("| nftables masquerade | 16.7 (1.00× nft) |"), "{s}");
        assert!(s.contains("(tc ingress) | 60.0 |"), "{s}");
        assert!(s.starts_with(BEGIN) && s.trim_end().ends_with(END), "{s}");
        assert!(s.contains("6.1.0-57-amd64"));
        assert!(s.contains("| our NAT / nftables masquerade | 1.20× |"), "{s}");
        assert!(
            s.contains("| nftables masquerade / kernel forwarding | 0.71× |"),
            "{s}"
        );
        assert!(
            s.contains("| kernel forwarding (no NAT) | 42.0 (40.0–44.0) |"),
            "{s}"
        );
        // The reason, without a pipe that would split the table cell.
        assert!(
            s.contains("| our NAT + internal XDP fast path | none [1] | not run | not run |"),
            "{s}"
        );
        assert!(
            s.contains("- [1] failed to attach: R9 invalid mem access / scalar"),
            "{s}"
        );
        assert!(
            s.contains("| our NAT + fast path / nftables masquerade | – |"),
            "{s}"
        );
        assert!(s.contains("Settings { rounds: 3 }"));
    }
}
