//! The study's figure: validation loss over steps per variant, and ROUGE-1 and the final
//! validation loss against rank; means over the fine-tuning seeds, with a band or bars of ±
//! one standard deviation.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use super::report::{Study, each, mean_std};
use super::variant::RunResult;
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
    let ranks = |value: fn(&RunResult) -> f64| -> Vec<(f64, f64, f64)> {
        study
            .sweep
            .iter()
            .map(|(rank, runs)| {
                let (mean, std) = mean_std(&each(runs, value));
                (*rank as f64, mean, std)
            })
            .collect()
    };
    let full = |value: fn(&RunResult) -> f64| mean_std(&each(study.runs(Variant::Full), value)).0;
    against_rank(
        &panels[1],
        "ROUGE-1 vs rank (LoRA Q,V)",
        "ROUGE-1 F1",
        ranks(|r| r.rouge1),
        Some(full(|r| r.rouge1)),
        SeriesLabelPosition::LowerRight,
    )?;
    against_rank(
        &panels[2],
        "Final validation loss vs rank (LoRA Q,V)",
        "validation loss",
        ranks(|r| r.final_val_loss()),
        Some(full(|r| r.final_val_loss())),
        SeriesLabelPosition::UpperRight,
    )?;
    root.present().map_err(text)
}

type Panel<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// (step, mean, standard deviation) at each validation point.
type Band = Vec<(f64, f64, f64)>;

/// The mean curve of `runs` and its standard deviation at each validation point (the runs
/// validate at the same steps).
fn mean_curve(runs: &[RunResult]) -> Band {
    runs[0]
        .curve
        .iter()
        .enumerate()
        .map(|(i, (step, _))| {
            let losses: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.curve.get(i).map(|(_, loss)| *loss))
                .collect();
            let (mean, std) = mean_std(&losses);
            (*step as f64, mean, std)
        })
        .collect()
}

fn loss_curves(study: &Study, area: &Panel) -> Result<(), String> {
    let trained: Vec<(Variant, Band)> = study
        .comparison
        .iter()
        .filter(|(v, _)| *v != Variant::Base)
        .map(|(v, runs)| (*v, mean_curve(runs)))
        .collect();
    let points = trained.iter().flat_map(|(_, curve)| curve.iter());
    let max_step = points.clone().map(|(s, _, _)| *s).fold(1.0, f64::max);
    let (low, high) = bounds(points.flat_map(|(_, mean, std)| [mean - std, mean + std]));
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
        .y_desc("validation loss (mean +/- std)")
        .x_label_formatter(&|step| match (step - step.round()).abs() < 1e-9 {
            true => format!("{step:.0}"),
            false => String::new(),
        })
        .draw()
        .map_err(text)?;
    for (i, (variant, curve)) in trained.iter().enumerate() {
        let color = COLORS[(i + 1) % COLORS.len()];
        // The band: up along mean + std, back along mean − std.
        let band: Vec<(f64, f64)> = curve
            .iter()
            .map(|(s, m, d)| (*s, m + d))
            .chain(curve.iter().rev().map(|(s, m, d)| (*s, m - d)))
            .collect();
        chart
            .draw_series(std::iter::once(Polygon::new(band, color.mix(0.2).filled())))
            .map_err(text)?;
        chart
            .draw_series(LineSeries::new(
                curve.iter().map(|(s, m, _)| (*s, *m)),
                color.stroke_width(2),
            ))
            .map_err(text)?
            .label(variant.label())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    let base = study.runs(Variant::Base)[0].final_val_loss();
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

/// `points` are (rank, mean, std); the x axis is log2(rank), labelled with the ranks, and each
/// point has a bar of ± one standard deviation.
fn against_rank(
    area: &Panel,
    title: &str,
    y_desc: &str,
    points: Vec<(f64, f64, f64)>,
    full: Option<f64>,
    legend: SeriesLabelPosition,
) -> Result<(), String> {
    let spread: Vec<(f64, f64, f64)> = points
        .iter()
        .map(|(r, mean, std)| (r.log2(), *mean, *std))
        .collect();
    let points: Vec<(f64, f64)> = spread.iter().map(|(x, y, _)| (*x, *y)).collect();
    let max_log = points.iter().map(|(x, _)| *x).fold(0.0, f64::max);
    let (left, right) = (-0.4, max_log + 0.4);
    let (low, high) = bounds(
        spread
            .iter()
            .flat_map(|(_, y, d)| [y - d, y + d])
            .chain(full),
    );
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
        .label("LoRA Q,V, alpha 16 (mean +/- std)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], COLORS[2].stroke_width(2)));
    chart
        .draw_series(
            points
                .iter()
                .map(|p| Circle::new(*p, 4, COLORS[2].filled())),
        )
        .map_err(text)?;
    // ± one standard deviation, with caps.
    let cap = 0.08;
    chart
        .draw_series(spread.iter().flat_map(|(x, y, d)| {
            [
                PathElement::new(vec![(*x, y - d), (*x, y + d)], COLORS[2].stroke_width(1)),
                PathElement::new(vec![(x - cap, y - d), (x + cap, y - d)], COLORS[2]),
                PathElement::new(vec![(x - cap, y + d), (x + cap, y + d)], COLORS[2]),
            ]
        }))
        .map_err(text)?;
    if let Some(full) = full {
        chart
            .draw_series(LineSeries::new(
                [(left, full), (right, full)],
                COLORS[1].stroke_width(1),
            ))
            .map_err(text)?
            .label("full fine-tuning (mean)")
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
