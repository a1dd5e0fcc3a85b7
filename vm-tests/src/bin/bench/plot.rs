//! The plots in BENCHMARKS.md as self-contained SVG (no plotting tool needed): grouped bars of
//! packets per second. Bars are medians, whiskers min..max over the repetitions; a reference
//! line (the generator's ceiling) is drawn when it fits the scale, else named in a corner.

use std::fmt::Write;

/// One bar.
#[derive(Clone, Debug)]
pub struct Bar {
    /// Median value (None: unavailable, drawn as a hatched stub with "n/a").
    pub value: Option<f64>,
    /// Min and max of the samples.
    pub range: Option<(f64, f64)>,
}

/// One group of bars (a direction).
#[derive(Clone, Debug)]
pub struct Group {
    /// Label under the group.
    pub label: String,
    /// One bar per series.
    pub bars: Vec<Bar>,
}

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 440.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_RIGHT: f64 = 20.0;
const MARGIN_TOP: f64 = 50.0;
const MARGIN_BOTTOM: f64 = 110.0;
/// Fraction of a group's width taken by bars.
const GROUP_FILL: f64 = 0.8;
/// Series colours of the comparison (colour-blind friendly, Okabe-Ito): one per contender.
pub const CONTENDER_COLOURS: [&str; 6] = ["#888888", "#e69f00", "#d55e00", "#56b4e9", "#009e73", "#cc79a7"];
/// Series colours of the scale plot: our NAT light/dark blue, the fast path light/dark green
/// (outbound, inbound), so the NAT keeps its colour family from the comparison.
pub const SCALE_COLOURS: [&str; 4] = ["#56b4e9", "#0072b2", "#7fd4a8", "#009e73"];
/// Horizontal grid lines.
const TICKS: usize = 5;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A reference line further above the highest bar than this factor is not drawn to scale
/// (it would squash the bars), only named.
const REFERENCE_MAX_FACTOR: f64 = 1.6;

/// A "nice" axis maximum at or above `max`.
fn nice_max(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(max.log10().floor());
    for step in [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0] {
        if step * mag >= max {
            return step * mag;
        }
    }
    10.0 * mag
}

/// Renders a grouped bar chart of Mpps. `series` names the bars of each group, in order, drawn
/// in `colours` (cycled); `reference` is a labelled horizontal line (name, pps).
pub fn bars_svg(
    title: &str,
    series: &[&str],
    colours: &[&str],
    groups: &[Group],
    reference: Option<(&str, f64)>,
) -> String {
    let colour = |i: usize| {
        colours
            .get(i % colours.len().max(1))
            .copied()
            .unwrap_or("#888888")
    };
    let top = groups
        .iter()
        .flat_map(|g| &g.bars)
        .filter_map(|b| b.range.map(|r| r.1).or(b.value))
        .fold(0.0, f64::max);
    let drawn = reference.filter(|(_, pps)| *pps <= top * REFERENCE_MAX_FACTOR);
    let top = drawn.map_or(top, |(_, pps)| top.max(pps));
    let y_max = nice_max(top / 1e6);
    let plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM;
    let y = |pps: f64| MARGIN_TOP + plot_h * (1.0 - (pps / 1e6) / y_max);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    for i in 0..=TICKS {
        let v = y_max * i as f64 / TICKS as f64;
        let yy = y(v * 1e6);
        let _ = writeln!(
            s,
            r##"<line x1="{MARGIN_LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#dddddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v:.2}</text>"##,
            WIDTH - MARGIN_RIGHT,
            MARGIN_LEFT - 6.0,
            yy + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" transform="rotate(-90 18 {:.1})" text-anchor="middle">million packets per second</text>"#,
        MARGIN_TOP + plot_h / 2.0,
        MARGIN_TOP + plot_h / 2.0
    );
    let group_w = plot_w / groups.len().max(1) as f64;
    let bar_w = group_w * GROUP_FILL / series.len().max(1) as f64;
    for (gi, g) in groups.iter().enumerate() {
        let gx = MARGIN_LEFT + gi as f64 * group_w + group_w * (1.0 - GROUP_FILL) / 2.0;
        for (bi, b) in g.bars.iter().enumerate() {
            let x = gx + bi as f64 * bar_w;
            let fill = colour(bi);
            match b.value {
                Some(v) => {
                    let yy = y(v);
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.1}" y="{yy:.1}" width="{:.1}" height="{:.1}" fill="{fill}"><title>{}: {:.3} Mpps</title></rect>"#,
                        bar_w - 2.0,
                        MARGIN_TOP + plot_h - yy,
                        escape(series.get(bi).copied().unwrap_or("")),
                        v / 1e6
                    );
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{:.2}</text>"#,
                        x + bar_w / 2.0 - 1.0,
                        yy - 4.0,
                        v / 1e6
                    );
                    if let Some((lo, hi)) = b.range {
                        let cx = x + bar_w / 2.0 - 1.0;
                        let _ = writeln!(
                            s,
                            r#"<line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="black"/>"#,
                            y(lo),
                            y(hi)
                        );
                    }
                }
                None => {
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">n/a</text>"#,
                        x + bar_w / 2.0 - 1.0,
                        MARGIN_TOP + plot_h - 4.0
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            MARGIN_LEFT + gi as f64 * group_w + group_w / 2.0,
            MARGIN_TOP + plot_h + 18.0,
            escape(&g.label)
        );
    }
    match (reference, drawn) {
        (Some((name, pps)), Some(_)) => {
            let yy = y(pps);
            let _ = writeln!(
                s,
                r#"<line x1="{MARGIN_LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="black" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">{} {:.2} Mpps</text>"#,
                WIDTH - MARGIN_RIGHT,
                WIDTH - MARGIN_RIGHT,
                yy - 4.0,
                escape(name),
                pps / 1e6
            );
        }
        (Some((name, pps)), None) => {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">{} {:.2} Mpps (off the scale)</text>"#,
                WIDTH - MARGIN_RIGHT,
                MARGIN_TOP - 8.0,
                escape(name),
                pps / 1e6
            );
        }
        _ => {}
    }
    let _ = writeln!(
        s,
        r#"<line x1="{MARGIN_LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
        MARGIN_TOP + plot_h,
        WIDTH - MARGIN_RIGHT,
        MARGIN_TOP + plot_h
    );
    // Legend, two columns under the axis labels.
    for (i, name) in series.iter().enumerate() {
        let col = (i % 2) as f64;
        let row = (i / 2) as f64;
        let lx = MARGIN_LEFT + col * plot_w / 2.0;
        let ly = MARGIN_TOP + plot_h + 45.0 + row * 20.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="14" height="14" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            ly - 11.0,
            colour(i),
            lx + 20.0,
            ly,
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bars_labels_and_missing_values() {
        let svg = bars_svg(
            "t",
            &["a", "b"],
            &CONTENDER_COLOURS,
            &[Group {
                label: "out".into(),
                bars: vec![
                    Bar {
                        value: Some(1.5e6),
                        range: Some((1.4e6, 1.6e6)),
                    },
                    Bar {
                        value: None,
                        range: None,
                    },
                ],
            }],
            Some(("generator ceiling", 2e6)),
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("1.50"));
        assert!(svg.contains("n/a"));
        assert!(svg.contains("generator ceiling 2.00 Mpps"));
        let far = bars_svg("t", &["a"], &SCALE_COLOURS, &[], Some(("ceiling", 9e6)));
        assert!(far.contains("(off the scale)"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(nice_max(1.7), 2.0);
        assert_eq!(nice_max(1.2), 1.5);
        assert_eq!(nice_max(0.0), 1.0);
    }
}
