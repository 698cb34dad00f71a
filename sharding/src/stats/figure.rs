//! The composition figure of `radit data stats` (the paper's Figure 1 kind of picture): per dataset its images by
//! split, its sex, view and race mix, its age (mean ± sd), and the positive share of each finding over the store.
//! An RGB PNG drawn here, text in the public-domain 8x8 font of `font8x8`, so no font or plotting stack is needed
//! on a cluster's login node.

use super::{ALL, ClassCount, DataStats, GroupStats};
use crate::split::Split;

type Rgb = [u8; 3];

const WHITE: Rgb = [255, 255, 255];
const INK: Rgb = [30, 30, 30];
const FAINT: Rgb = [200, 200, 200];
const MISSING: Rgb = [215, 215, 215];
/// Colour-blind-safe (Okabe-Ito) for the classes of a variable, in order.
const PALETTE: [Rgb; 7] = [
    [0, 114, 178],
    [230, 159, 0],
    [0, 158, 115],
    [204, 121, 167],
    [86, 180, 233],
    [213, 94, 0],
    [240, 228, 66],
];

const WIDTH: usize = 1200;
const LABEL: usize = 150;
const ROW: usize = 16;
const BAR: usize = 11;

struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<Rgb>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            pixels: vec![WHITE; width * height],
        }
    }

    fn rect(&mut self, x: usize, y: usize, w: usize, h: usize, colour: Rgb) {
        for yy in y..(y + h).min(self.height) {
            for xx in x..(x + w).min(self.width) {
                self.pixels[yy * self.width + xx] = colour;
            }
        }
    }

    /// Text at (x, y), the top left of its first glyph, `scale` pixels per font pixel.
    fn text(&mut self, x: usize, y: usize, text: &str, scale: usize, colour: Rgb) {
        for (i, ch) in text.chars().enumerate() {
            let code = if ch == '±' { b'+' } else { ch as u8 };
            let glyph = if ch.is_ascii() || ch == '±' {
                font8x8::legacy::BASIC_LEGACY[usize::from(code & 0x7f)]
            } else {
                font8x8::legacy::BASIC_LEGACY[usize::from(b'?')]
            };
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        self.rect(
                            x + (i * 8 + col) * scale,
                            y + row * scale,
                            scale,
                            scale,
                            colour,
                        );
                    }
                }
            }
        }
    }

    fn png(&self) -> Vec<u8> {
        let bytes: Vec<u8> = self.pixels.iter().flatten().copied().collect();
        crate::image::encode_png8(
            self.width as u32,
            self.height as u32,
            png::ColorType::Rgb,
            &bytes,
        )
    }
}

/// A horizontal bar of `segments` (value, colour) scaled so that `full` fills `width`.
fn stacked(
    c: &mut Canvas,
    x: usize,
    y: usize,
    width: usize,
    full: f64,
    segments: &[(f64, Rgb)],
) -> usize {
    let mut at = 0.0;
    let mut end = x;
    for (value, colour) in segments {
        if full <= 0.0 {
            break;
        }
        let from = x + (at / full * width as f64).round() as usize;
        at += value;
        let to = x + (at / full * width as f64).round() as usize;
        c.rect(from, y, to.saturating_sub(from), BAR, *colour);
        end = to;
    }
    end
}

fn legend(c: &mut Canvas, x: usize, y: usize, names: &[String], colours: &[Rgb]) {
    let mut at = x;
    for (name, colour) in names.iter().zip(colours) {
        c.rect(at, y, 10, 8, *colour);
        c.text(at + 14, y, name, 1, INK);
        at += 14 + name.len() * 8 + 16;
    }
}

/// Colours of a variable's classes: the present classes from the palette, `missing` grey.
fn class_colours(counts: &[ClassCount]) -> Vec<Rgb> {
    counts
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if c.class == "missing" {
                MISSING
            } else {
                PALETTE[i % PALETTE.len()]
            }
        })
        .collect()
}

/// The figure as PNG bytes.
pub fn composition_png(stats: &DataStats) -> Vec<u8> {
    let datasets: Vec<&GroupStats> = stats
        .groups
        .iter()
        .filter(|g| g.split == ALL && g.dataset != ALL)
        .collect();
    let total = stats
        .groups
        .iter()
        .find(|g| g.split == ALL && g.dataset == ALL);
    let n = datasets.len().max(1);
    let panel = 24 + n * ROW + 20;
    let height = 40 + 2 * panel + 24 + 14 * ROW + 30;
    let mut c = Canvas::new(WIDTH, height);
    let title = match total {
        Some(t) => format!(
            "{} images, {} patients, {} datasets",
            t.images,
            t.patients,
            datasets.len()
        ),
        None => "empty store".into(),
    };
    c.text(10, 10, &title, 2, INK);

    // Row 1: images by split (absolute), and age.
    let half = (WIDTH - 3 * 10) / 2;
    let (left, right) = (10, 20 + half);
    let top = 40;
    let most = datasets.iter().map(|g| g.images).max().unwrap_or(1) as f64;
    c.text(left, top, "Images per dataset, by split", 1, INK);
    let splits: Vec<String> = Split::ALL.iter().map(|s| s.name().to_string()).collect();
    legend(&mut c, left + LABEL, top + 12, &splits, &PALETTE[..3]);
    c.text(right, top, "Age in years: mean +- sd", 1, INK);
    let body = top + 24;
    let bar_width = half - LABEL - 70;
    let (age_x, age_w) = (right + LABEL, half - LABEL - 20);
    for years in [0usize, 25, 50, 75, 100] {
        let x = age_x + years * age_w / 100;
        c.rect(x, body - 4, 1, n * ROW + 4, FAINT);
        c.text(x.saturating_sub(8), top + 12, &years.to_string(), 1, INK);
    }
    for (i, g) in datasets.iter().enumerate() {
        let y = body + i * ROW;
        c.text(left, y + 2, &g.dataset, 1, INK);
        let parts: Vec<(f64, Rgb)> = Split::ALL
            .iter()
            .zip(PALETTE)
            .map(|(s, colour)| {
                let images = stats
                    .groups
                    .iter()
                    .find(|x| x.split == s.name() && x.dataset == g.dataset)
                    .map_or(0, |x| x.images);
                (images as f64, colour)
            })
            .collect();
        let end = stacked(&mut c, left + LABEL, y, bar_width, most, &parts);
        c.text(end + 4, y + 2, &g.images.to_string(), 1, INK);

        c.text(right, y + 2, &g.dataset, 1, INK);
        let (x0, w) = (age_x, age_w);
        c.rect(x0, y + BAR / 2, w, 1, FAINT);
        if let Some(mean) = g.age.mean {
            let at = |years: f64| x0 + ((years.clamp(0.0, 100.0) / 100.0) * w as f64) as usize;
            let sd = g.age.sd.unwrap_or(0.0);
            let (a, b) = (at(mean - sd), at(mean + sd));
            c.rect(
                a,
                y + BAR / 2 - 1,
                b.saturating_sub(a).max(1),
                3,
                PALETTE[0],
            );
            c.rect(at(mean).saturating_sub(2), y, 5, BAR, INK);
        }
    }

    // Row 2: sex, view and race as shares of each dataset's images.
    let third = (WIDTH - 4 * 10) / 3;
    let top = top + panel;
    for (k, (name, pick)) in [
        (
            "Sex",
            (|g: &GroupStats| g.sex.clone()) as fn(&GroupStats) -> Vec<ClassCount>,
        ),
        ("View", |g: &GroupStats| g.view.clone()),
        ("Race", |g: &GroupStats| g.race.clone()),
    ]
    .into_iter()
    .enumerate()
    {
        let x = 10 + k * (third + 10);
        c.text(x, top, &format!("{name}, share of images"), 1, INK);
        if let Some(first) = datasets.first() {
            let counts = pick(first);
            let names: Vec<String> = counts.iter().map(|c| c.class.clone()).collect();
            legend(&mut c, x, top + 12, &names, &class_colours(&counts));
        }
        for (i, g) in datasets.iter().enumerate() {
            let y = top + 24 + i * ROW;
            let label: String = g.dataset.chars().take(10).collect();
            c.text(x, y + 2, &label, 1, INK);
            let counts = pick(g);
            let colours = class_colours(&counts);
            let parts: Vec<(f64, Rgb)> = counts
                .iter()
                .zip(colours)
                .map(|(c, colour)| (c.images as f64, colour))
                .collect();
            stacked(&mut c, x + 88, y, third - 96, g.images as f64, &parts);
        }
    }

    // Row 3: each finding's positive share where it is known, over the store.
    let top = top + panel;
    c.text(
        10,
        top,
        "Positive findings, % of the images where the finding is known (all splits, all datasets)",
        1,
        INK,
    );
    if let Some(t) = total {
        let width = WIDTH - 20 - 220 - 100;
        for (i, f) in t.findings.iter().enumerate() {
            let y = top + 20 + i * ROW;
            c.text(10, y + 2, &f.finding, 1, INK);
            let known = (f.positive + f.negative) as f64;
            let share = if known > 0.0 {
                f.positive as f64 / known
            } else {
                0.0
            };
            let end = stacked(&mut c, 230, y, width, 1.0, &[(share, PALETTE[5])]);
            let text = if known > 0.0 {
                format!("{:.1}% of {}", 100.0 * share, f.positive + f.negative)
            } else {
                "not known".into()
            };
            c.text(end + 4, y + 2, &text, 1, INK);
        }
    }
    c.png()
}
