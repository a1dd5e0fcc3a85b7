//! ICMP errors as scapy sees them: a captured frame is dissected by scapy (an implementation
//! independent of [`crate::packet`]) and every checksum recomputed, including the embedded
//! transport checksum when the embedded datagram is complete; and scapy snippets that build
//! ICMP errors about a flow.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{ensure, Context, Result};

use crate::netns::Netns;
use crate::packet::Frame;
use crate::tools::scapy;

/// One ICMP error, dissected by scapy.
#[derive(Clone, Debug)]
pub struct ScapyIcmpError {
    /// Outer source.
    pub outer_src: Ipv4Addr,
    /// Outer destination.
    pub outer_dst: Ipv4Addr,
    /// ICMP type.
    pub kind: u8,
    /// ICMP code.
    pub code: u8,
    /// The outer IP header checksum is right.
    pub ip_ok: bool,
    /// The ICMP checksum is right.
    pub icmp_ok: bool,
    /// Embedded source.
    pub inner_src: SocketAddrV4,
    /// Embedded destination.
    pub inner_dst: SocketAddrV4,
    /// Embedded protocol.
    pub inner_proto: u8,
    /// Embedded IP header length in bytes.
    pub inner_ihl: u8,
    /// The embedded IP header checksum is right.
    pub inner_ip_ok: bool,
    /// The embedded TCP/UDP checksum is right; `None` when the embedded datagram is truncated
    /// (it cannot be checked, RFC 5508 REQ-3c).
    pub inner_l4_ok: Option<bool>,
    /// Raw frame, for messages.
    pub summary: String,
}

impl ScapyIcmpError {
    /// Fails unless every checksum scapy could check is right.
    pub fn checksums_ok(&self) -> Result<()> {
        ensure!(self.ip_ok, "outer IP checksum wrong: {}", self.summary);
        ensure!(self.icmp_ok, "ICMP checksum wrong: {}", self.summary);
        ensure!(self.inner_ip_ok, "embedded IP checksum wrong: {}", self.summary);
        ensure!(
            self.inner_l4_ok != Some(false),
            "embedded transport checksum wrong: {}",
            self.summary
        );
        Ok(())
    }

    /// Whether the frame holds `needle` anywhere: for "no internal address leaked" checks.
    pub fn frame_contains(frame: &Frame, needle: Ipv4Addr) -> bool {
        frame.contains(&needle.octets())
    }
}

const PARSE_PY: &str = r#"
import json
out = []
for h in FRAMES:
    f = Ether(bytes.fromhex(h))
    ip = f[IP]
    c = ip.copy(); c.chksum = None
    ip_ok = IP(raw(c)).chksum == ip.chksum
    ic = f[ICMP]
    c = ic.copy(); c.chksum = None
    icmp_ok = ICMP(raw(c)).chksum == ic.chksum
    inner = f[IPerror]
    c = inner.copy(); c.chksum = None
    inner_ip_ok = IPerror(raw(c)).chksum == inner.chksum
    l4 = inner.payload
    data = bytearray(raw(l4))
    sport = dport = 0
    l4_ok = None
    if inner.proto in (6, 17) and len(data) >= 4:
        sport = int.from_bytes(data[0:2], 'big'); dport = int.from_bytes(data[2:4], 'big')
        off = 16 if inner.proto == 6 else 6
        complete = inner.len == inner.ihl * 4 + len(data) and len(data) >= off + 2
        if complete:
            got = int.from_bytes(data[off:off + 2], 'big')
            if inner.proto == 17 and got == 0:
                l4_ok = True
            else:
                data[off:off + 2] = b'\0\0'
                want = in4_chksum(inner.proto, inner, bytes(data))
                if inner.proto == 17 and want == 0:
                    want = 0xffff
                l4_ok = got == want
    out.append(dict(outer_src=ip.src, outer_dst=ip.dst, type=ic.type, code=ic.code, ip_ok=ip_ok,
                    icmp_ok=icmp_ok, inner_src=inner.src, inner_dst=inner.dst, inner_proto=inner.proto,
                    inner_ihl=inner.ihl * 4, inner_ip_ok=inner_ip_ok, sport=sport, dport=dport,
                    inner_l4_ok=l4_ok, summary=f.summary()))
print(json.dumps(out))
"#;

/// Dissects ICMP error frames with scapy (run in `ns`; any namespace will do).
pub fn scapy_parse(ns: &Netns, frames: &[&Frame]) -> Result<Vec<ScapyIcmpError>> {
    if frames.is_empty() {
        return Ok(Vec::new());
    }
    let hex: Vec<String> = frames
        .iter()
        .map(|f| {
            format!(
                "'{}'",
                f.data.iter().map(|b| format!("{b:02x}")).collect::<String>()
            )
        })
        .collect();
    let out = scapy(ns, &format!("FRAMES = [{}]\n{PARSE_PY}", hex.join(", ")))?;
    let line = out.stdout.lines().last().unwrap_or_default();
    let v: Vec<serde_json::Value> =
        serde_json::from_str(line).with_context(|| format!("scapy printed {:?}", out.stdout))?;
    v.iter()
        .map(|e| {
            let ip = |k: &str| -> Result<Ipv4Addr> {
                e[k].as_str()
                    .with_context(|| format!("{k} in {e}"))?
                    .parse()
                    .with_context(|| format!("{k} in {e}"))
            };
            let num = |k: &str| -> Result<u64> { e[k].as_u64().with_context(|| format!("{k} in {e}")) };
            let flag = |k: &str| -> Result<bool> { e[k].as_bool().with_context(|| format!("{k} in {e}")) };
            Ok(ScapyIcmpError {
                outer_src: ip("outer_src")?,
                outer_dst: ip("outer_dst")?,
                kind: num("type")? as u8,
                code: num("code")? as u8,
                ip_ok: flag("ip_ok")?,
                icmp_ok: flag("icmp_ok")?,
                inner_src: SocketAddrV4::new(ip("inner_src")?, num("sport")? as u16),
                inner_dst: SocketAddrV4::new(ip("inner_dst")?, num("dport")? as u16),
                inner_proto: num("inner_proto")? as u8,
                inner_ihl: num("inner_ihl")? as u8,
                inner_ip_ok: flag("inner_ip_ok")?,
                inner_l4_ok: e["inner_l4_ok"].as_bool(),
                summary: e["summary"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// A scapy expression for an ICMP error (`kind`/`code`, optional next-hop MTU for 3/4) from
/// `src` to `dst`, embedding the packet `embedded` (a scapy expression such as
/// `IP(src=..., dst=...)/UDP(...)`).
pub fn icmp_error_expr(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: u8,
    code: u8,
    mtu: Option<u16>,
    embedded: &str,
) -> String {
    let mtu = mtu.map(|m| format!(", nexthopmtu={m}")).unwrap_or_default();
    format!("IP(src='{src}', dst='{dst}')/ICMP(type={kind}, code={code}{mtu})/{embedded}")
}
