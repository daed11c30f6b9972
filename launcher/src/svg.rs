//! `--svg FILE`: the memory plan as a stacked bar per pipeline stage (grouped like the table),
//! with the device capacity and the usable line (capacity less headroom) drawn across.

use std::fmt::Write as _;

use tessera_plan::bytes::{Unit, format_size};
use tessera_plan::config::Config;
use tessera_plan::memory::{Category, MemoryPlan, Place};

use crate::dryrun::stage_groups;

const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 580.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 790.0;
const TOP: f64 = 80.0;
const BOTTOM: f64 = 470.0;
/// Zoom in on the bars when the peak is less than 1/20 of the usable memory.
const ZOOM_BELOW: u64 = 20;

/// Category colours (Tableau 10, distinguishable in print and for most colour vision).
fn colour(category: Category) -> &'static str {
    match category {
        Category::Params => "#4e79a7",
        Category::Grads => "#f28e2b",
        Category::Master => "#9c755f",
        Category::Optimizer => "#76b7b2",
        Category::Activations => "#59a14f",
        Category::Workspace => "#edc948",
        Category::Comm => "#b07aa1",
        Category::Runtime => "#bab0ac",
        Category::Checkpoint => "#ff9da7",
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round tick step giving about six ticks up to `max` (in `unit`s).
fn tick_step(max: f64) -> f64 {
    let rough = max / 6.0;
    let magnitude = 10f64.powf(rough.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&step| step >= rough)
        .unwrap_or(10.0 * magnitude)
}

pub fn render(name: &str, config: &Config, plan: &MemoryPlan) -> String {
    let groups = stage_groups(plan);
    // Bars of a plan that uses a sliver of the device would be invisible against its capacity:
    // then the chart scales to the peak and says where capacity and the usable line are.
    let zoomed = plan.peak_bytes().saturating_mul(ZOOM_BELOW) < plan.usable;
    let scale = if zoomed {
        plan.peak_bytes().max(1)
    } else {
        plan.capacity.max(plan.peak_bytes())
    };
    let top_bytes = scale as f64 * 1.08;
    let unit = Unit::for_bytes(scale);
    let y = |bytes: f64| BOTTOM - (BOTTOM - TOP) * bytes / top_bytes;
    let slot = (RIGHT - LEFT) / groups.len() as f64;
    let bar = (slot * 0.7).min(70.0);
    let parallel = &config.parallel;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="30" font-size="17" font-weight="bold">Memory per rank: {}</text>"#,
        escape(name)
    );
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="52" fill="#444">data {} x tensor {} x pipeline {} on {} x {} devices of {}; {}, ZeRO-{}, {}{}</text>"##,
        parallel.data,
        parallel.tensor,
        parallel.pipeline,
        config.cluster.nodes,
        config.cluster.gpus_per_node,
        format_size(plan.capacity),
        config.training.precision,
        parallel.zero.stage(),
        parallel.recompute.describe(),
        if parallel.offload.optimizer {
            ", optimizer in host memory"
        } else {
            ""
        },
    );

    // Axis and ticks.
    let step = tick_step(top_bytes / unit.bytes() as f64);
    let mut tick = 0.0;
    while tick * (unit.bytes() as f64) <= top_bytes {
        let ty = y(tick * unit.bytes() as f64);
        let _ = writeln!(
            svg,
            r##"<line class="grid" x1="{LEFT}" y1="{ty:.1}" x2="{RIGHT}" y2="{ty:.1}" stroke="#e6e6e6"/>"##
        );
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#444">{}</text>"##,
            LEFT - 8.0,
            ty + 4.0,
            trim_number(tick)
        );
        tick += step;
    }
    let _ = writeln!(
        svg,
        r##"<text transform="translate(28 {:.1}) rotate(-90)" text-anchor="middle" fill="#444">{} per rank</text>"##,
        (TOP + BOTTOM) / 2.0,
        unit.name()
    );
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" y1="{BOTTOM}" x2="{RIGHT}" y2="{BOTTOM}" stroke="#222"/>"##
    );

    // One stacked bar per group of identical stages.
    let rotate = groups.len() > 10;
    for (i, group) in groups.iter().enumerate() {
        let stage = group.plan;
        let x = LEFT + slot * (i as f64 + 0.5) - bar / 2.0;
        let _ = writeln!(
            svg,
            r#"<g class="bar" data-stages="{}">"#,
            escape(&group.label())
        );
        let mut base = 0.0;
        for category in Category::ALL {
            let bytes = stage.bytes(Place::Device, category);
            if bytes == 0 {
                continue;
            }
            let (y0, y1) = (y(base), y(base + bytes as f64));
            let _ = writeln!(
                svg,
                r##"<rect class="segment" data-category="{}" data-bytes="{bytes}" x="{x:.1}" y="{y1:.2}" width="{bar:.1}" height="{:.2}" fill="{}" stroke="#ffffff" stroke-width="0.5"><title>{}: {} {} ({bytes} bytes)</title></rect>"##,
                category.name(),
                y0 - y1,
                colour(category),
                escape(&group.label()),
                category.name(),
                format_size(bytes),
            );
            base += bytes as f64;
        }
        let total = stage.device_bytes();
        let over = total > plan.usable;
        let _ = writeln!(
            svg,
            r##"<text class="total" x="{:.1}" y="{:.1}" text-anchor="middle" fill="{}" font-weight="{}">{}</text>"##,
            x + bar / 2.0,
            y(total as f64) - 5.0,
            if over { "#c0392b" } else { "#222" },
            if over { "bold" } else { "normal" },
            unit.format(total),
        );
        let (lx, ly) = (x + bar / 2.0, BOTTOM + 16.0);
        if rotate {
            let _ = writeln!(
                svg,
                r##"<text x="{lx:.1}" y="{ly:.1}" text-anchor="end" transform="rotate(-45 {lx:.1} {ly:.1})" fill="#222">{}</text>"##,
                escape(&group.label())
            );
        } else {
            let _ = writeln!(
                svg,
                r##"<text x="{lx:.1}" y="{ly:.1}" text-anchor="middle" fill="#222">{}</text>"##,
                escape(&group.label())
            );
        }
        let _ = writeln!(svg, "</g>");
    }

    // Capacity and usable memory, labelled in the right margin on two lines.
    let headroom = format!("{}% headroom", (config.cluster.headroom * 100.0).round());
    let lines = [
        (
            "capacity",
            plan.capacity,
            "capacity",
            String::new(),
            r##"stroke="#222" stroke-width="1.5""##,
            "#222",
        ),
        (
            "usable",
            plan.usable,
            "usable",
            headroom,
            r##"stroke="#c0392b" stroke-width="1.5" stroke-dasharray="6 4""##,
            "#c0392b",
        ),
    ];
    if zoomed {
        let _ = writeln!(
            svg,
            r##"<text class="off-chart" x="{RIGHT}" y="{:.1}" text-anchor="end" fill="#c0392b">capacity {} and usable {} are far above this chart: the peak uses {:.1}% of usable</text>"##,
            TOP - 12.0,
            format_size(plan.capacity),
            format_size(plan.usable),
            100.0 * plan.peak_bytes() as f64 / plan.usable as f64,
        );
    } else {
        for (class, bytes, first, second, style, fill) in lines {
            let ly = y(bytes as f64);
            let _ = writeln!(
                svg,
                r#"<line class="{class}" x1="{LEFT}" y1="{ly:.2}" x2="{RIGHT}" y2="{ly:.2}" {style}/>"#
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" fill="{fill}">{first} {}<tspan x="{:.1}" dy="14">{second}</tspan></text>"#,
                RIGHT + 8.0,
                ly + 4.0,
                format_size(bytes),
                RIGHT + 8.0,
            );
        }
    }

    // Legend: the categories present, top of the stack first.
    let present: Vec<Category> = Category::ALL
        .into_iter()
        .filter(|&c| plan.stages.iter().any(|s| s.bytes(Place::Device, c) > 0))
        .collect();
    let legend_top = BOTTOM - 20.0 * present.len() as f64;
    for (i, category) in present.iter().rev().enumerate() {
        let ly = legend_top + 20.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<rect class="legend" x="{:.1}" y="{ly:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            RIGHT + 8.0,
            colour(*category),
            RIGHT + 26.0,
            ly + 10.0,
            category.name()
        );
    }
    let verdict = if plan.fits() {
        format!(
            "fits: peak {} of {} usable",
            format_size(plan.peak_bytes()),
            format_size(plan.usable)
        )
    } else {
        format!(
            "does not fit: peak {} over {} usable",
            format_size(plan.peak_bytes()),
            format_size(plan.usable)
        )
    };
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="{:.1}" fill="{}" font-weight="bold">{}</text>"##,
        HEIGHT - 20.0,
        if plan.fits() { "#2e7d32" } else { "#c0392b" },
        escape(&verdict)
    );
    svg.push_str("</svg>\n");
    svg
}

/// 2.5 -> "2.5", 10.0 -> "10".
fn trim_number(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(86.4), 20.0);
        assert_eq!(tick_step(6.0), 1.0);
        assert_eq!(tick_step(0.9), 0.2);
        assert_eq!(trim_number(2.5), "2.5");
        assert_eq!(trim_number(10.0), "10");
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(escape("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
    }
}
