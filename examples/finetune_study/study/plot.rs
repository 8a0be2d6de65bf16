//! The study's figure: validation loss over steps per variant, and ROUGE-1 and the final
//! validation loss against rank.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use super::report::Study;
use super::variant::Variant;

/// DejaVu Sans cut down to ASCII, bundled so that plotting needs no system fonts.
const FONT: &[u8] = include_bytes!("../DejaVuSans-subset.ttf");

const COLORS: [RGBColor; 4] = [
    RGBColor(120, 120, 120),
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
];

/// Draws the figure into a PNG at `path`.
pub fn draw(study: &Study, path: &Path) -> Result<(), String> {
    register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| "the bundled font is not a valid TrueType font".to_string())?;
    let root = BitMapBackend::new(path, (1500, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(text)?;
    let panels = root.split_evenly((1, 3));
    loss_curves(study, &panels[0])?;
    let ranks: Vec<(f64, f64, f64)> = study
        .sweep
        .iter()
        .map(|(rank, r)| (*rank as f64, r.rouge1, r.final_val_loss()))
        .collect();
    against_rank(
        &panels[1],
        "ROUGE-1 vs rank (LoRA Q,V)",
        "ROUGE-1 F1",
        ranks.iter().map(|(r, rouge, _)| (*r, *rouge)).collect(),
        Some(study.result(Variant::Full).rouge1),
        SeriesLabelPosition::LowerRight,
    )?;
    against_rank(
        &panels[2],
        "Final validation loss vs rank (LoRA Q,V)",
        "validation loss",
        ranks.iter().map(|(r, _, loss)| (*r, *loss)).collect(),
        Some(study.result(Variant::Full).final_val_loss()),
        SeriesLabelPosition::UpperRight,
    )?;
    root.present().map_err(text)
}

type Panel<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn loss_curves(study: &Study, area: &Panel) -> Result<(), String> {
    let trained: Vec<_> = study
        .comparison
        .iter()
        .filter(|(v, _)| *v != Variant::Base)
        .collect();
    let points = trained.iter().flat_map(|(_, r)| r.curve.iter());
    let max_step = points.clone().map(|(s, _)| *s).max().unwrap_or(1).max(1) as f64;
    let (low, high) = bounds(points.map(|(_, loss)| *loss));
    let mut chart = ChartBuilder::on(area)
        .caption("Validation loss on task B", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..max_step, low..high)
        .map_err(text)?;
    chart
        .configure_mesh()
        .x_desc("fine-tuning step")
        .y_desc("validation loss")
        .x_label_formatter(&|step| match (step - step.round()).abs() < 1e-9 {
            true => format!("{step:.0}"),
            false => String::new(),
        })
        .draw()
        .map_err(text)?;
    for (i, (variant, result)) in trained.iter().enumerate() {
        let color = COLORS[(i + 1) % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                result.curve.iter().map(|(s, l)| (*s as f64, *l)),
                color.stroke_width(2),
            ))
            .map_err(text)?
            .label(variant.label())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    let base = study.result(Variant::Base).final_val_loss();
    chart
        .draw_series(LineSeries::new(
            [(0.0, base), (max_step, base)],
            COLORS[0].stroke_width(1),
        ))
        .map_err(text)?
        .label(Variant::Base.label())
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], COLORS[0]));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(text)
}

/// `points` are (rank, value); the x axis is log2(rank), labelled with the ranks.
fn against_rank(
    area: &Panel,
    title: &str,
    y_desc: &str,
    points: Vec<(f64, f64)>,
    full: Option<f64>,
    legend: SeriesLabelPosition,
) -> Result<(), String> {
    let points: Vec<(f64, f64)> = points.iter().map(|(r, y)| (r.log2(), *y)).collect();
    let max_log = points.iter().map(|(x, _)| *x).fold(0.0, f64::max);
    let (left, right) = (-0.4, max_log + 0.4);
    let (low, high) = bounds(points.iter().map(|(_, y)| *y).chain(full));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(left..right, low..high)
        .map_err(text)?;
    chart
        .configure_mesh()
        .x_desc("rank r (log scale)")
        .y_desc(y_desc)
        .x_labels(max_log as usize + 2)
        .x_label_formatter(&|x| match (x - x.round()).abs() < 1e-6 && *x >= 0.0 {
            true => format!("{}", 2f64.powf(x.round())),
            false => String::new(),
        })
        .draw()
        .map_err(text)?;
    chart
        .draw_series(LineSeries::new(
            points.iter().copied(),
            COLORS[2].stroke_width(2),
        ))
        .map_err(text)?
        .label("LoRA Q,V, alpha 16")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], COLORS[2].stroke_width(2)));
    chart
        .draw_series(
            points
                .iter()
                .map(|p| Circle::new(*p, 4, COLORS[2].filled())),
        )
        .map_err(text)?;
    if let Some(full) = full {
        chart
            .draw_series(LineSeries::new(
                [(left, full), (right, full)],
                COLORS[1].stroke_width(1),
            ))
            .map_err(text)?
            .label("full fine-tuning")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], COLORS[1]));
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(text)
}

/// A y range around the values with a margin, and never empty.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (low, high) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !low.is_finite() {
        return (0.0, 1.0);
    }
    let margin = ((high - low) * 0.08).max(1e-3);
    (low - margin, high + margin)
}

fn text(error: impl std::fmt::Display) -> String {
    format!("cannot draw the plot: {error}")
}
