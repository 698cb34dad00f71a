//! What `radit run` tells the person watching: a periodic line (step, loss, images/s, tokens/s, MFU, ETA) and, on
//! a terminal, a progress bar under the lines. Rates are over the interval since the previous line.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use radit_coordinator::Totals;

/// The periodic line and the progress bar of one supervised run.
pub struct Reporter {
    bar: Option<ProgressBar>,
    total_steps: u64,
    /// Peak FLOP/s of the whole job, for MFU.
    peak_flops: Option<f64>,
    previous: Option<(Instant, Totals)>,
}

impl Reporter {
    /// A bar is drawn only when stderr is a terminal (and `RADIT_NO_PROGRESS_BAR` is unset); logs get lines only.
    pub fn new(total_steps: u64, peak_flops: Option<f64>) -> Self {
        let terminal =
            std::io::stderr().is_terminal() && std::env::var_os("RADIT_NO_PROGRESS_BAR").is_none();
        let bar = terminal.then(|| {
            let bar = ProgressBar::new(total_steps);
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{bar:40}] {pos}/{len} steps {msg}")
                    .expect("static template is valid")
                    .progress_chars("=> "),
            );
            bar
        });
        Self {
            bar,
            total_steps,
            peak_flops,
            previous: None,
        }
    }

    /// Prints a message above the bar (or plainly).
    pub fn say(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(message),
            None => eprintln!("{message}"),
        }
    }

    /// Prints the periodic line for this snapshot and moves the bar. `counted`: the snapshot carries the ranks'
    /// counters (not a placeholder from before any report), so rates may be taken from it.
    pub fn update(&mut self, now: Totals, generation: u64, counted: bool) {
        let at = Instant::now();
        let rates = self
            .previous
            .as_ref()
            .and_then(|(then, before)| Rates::between(before, &now, (at - *then).as_secs_f64()));
        let line = progress_line(&now, rates.as_ref(), self.total_steps, self.peak_flops);
        self.say(&format!("radit: {line} [generation {generation}]"));
        if let Some(bar) = &self.bar {
            bar.set_position(now.step);
            bar.set_message(
                eta_text(&now, self.total_steps).map_or(String::new(), |e| format!("ETA {e}")),
            );
        }
        self.previous = counted.then_some((at, now));
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Throughput over one interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub images_per_second: f64,
    pub tokens_per_second: f64,
    pub flops_per_second: f64,
}

impl Rates {
    /// `None` when no time passed or the counters went backwards (they do not, but a snapshot is not a promise).
    pub fn between(before: &Totals, now: &Totals, seconds: f64) -> Option<Self> {
        if seconds <= 0.0 || now.images < before.images {
            return None;
        }
        Some(Self {
            images_per_second: (now.images - before.images) / seconds,
            tokens_per_second: (now.tokens - before.tokens) / seconds,
            flops_per_second: (now.model_flops - before.model_flops) / seconds,
        })
    }
}

/// `step 1200/3000000 (0.0%) loss 0.4123 (max 0.4310) | 512 img/s 131.1k tok/s MFU 41.2% | 2.31 s/step ETA
/// 80d 04h | checkpoint 1000 | val loss 0.3987 @1000 FD 12.35 @1000`.
pub fn progress_line(
    t: &Totals,
    rates: Option<&Rates>,
    total_steps: u64,
    peak_flops: Option<f64>,
) -> String {
    let mut line = format!(
        "step {}/{total_steps} ({:.1}%)",
        t.step,
        100.0 * t.step as f64 / total_steps.max(1) as f64
    );
    if t.loss.is_finite() {
        line += &format!(" loss {:.4}", t.loss);
        if t.loss_max.is_finite() {
            line += &format!(" (max {:.4})", t.loss_max);
        }
    }
    if let Some(r) = rates {
        line += &format!(
            " | {} img/s {} tok/s",
            si(r.images_per_second),
            si(r.tokens_per_second)
        );
        if let Some(peak) = peak_flops.filter(|p| *p > 0.0) {
            line += &format!(" MFU {:.1}%", 100.0 * r.flops_per_second / peak);
        }
    }
    if let Some(m) = t.median_step_seconds {
        line += &format!(" | {m:.2} s/step");
    }
    if let Some(eta) = eta_text(t, total_steps) {
        line += &format!(" ETA {eta}");
    }
    if let Some(c) = t.checkpoint {
        line += &format!(" | checkpoint {c}");
    }
    if let Some((step, loss)) = t.val_loss {
        line += &format!(" | val loss {loss:.4} @{step}");
    }
    if let Some((step, fd)) = t.fd {
        line += &format!(" FD {fd:.2} @{step}");
    }
    line
}

fn eta_text(t: &Totals, total_steps: u64) -> Option<String> {
    let m = t.median_step_seconds?;
    Some(duration_text(m * total_steps.saturating_sub(t.step) as f64))
}

/// 3 significant figures with k / M / G.
fn si(v: f64) -> String {
    let (scaled, unit) = match v.abs() {
        a if a >= 1e9 => (v / 1e9, "G"),
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e3 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let digits = match scaled.abs() {
        a if a >= 100.0 => 0,
        a if a >= 10.0 => 1,
        _ => 2,
    };
    format!("{scaled:.digits$}{unit}")
}

/// `45s`, `12m 05s`, `3h 20m`, `18d 04h`.
pub fn duration_text(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(step: u64, images: f64, flops: f64) -> Totals {
        Totals {
            step,
            images,
            tokens: images * 256.0,
            model_flops: flops,
            loss: 0.41234,
            loss_max: 0.431,
            median_step_seconds: Some(2.31),
            checkpoint: Some(1000),
            val_loss: Some((1000, 0.39871)),
            fd: Some((1000, 12.346)),
        }
    }

    #[test]
    fn the_line_carries_step_loss_rates_mfu_and_eta() {
        let before = totals(1000, 512_000.0, 0.0);
        let now = totals(1200, 614_400.0, 1e15);
        let rates = Rates::between(&before, &now, 200.0).expect("time passed");
        assert_eq!(rates.images_per_second, 512.0);
        let line = progress_line(&now, Some(&rates), 3_000_000, Some(1e13 / 0.41));
        assert_eq!(
            line,
            "step 1200/3000000 (0.0%) loss 0.4123 (max 0.4310) | 512 img/s 131k tok/s MFU 20.5% | 2.31 s/step \
             ETA 80d 04h | checkpoint 1000 | val loss 0.3987 @1000 FD 12.35 @1000"
        );
        // Without a previous snapshot there are no rates, and without a peak no MFU.
        let first = progress_line(&now, None, 3_000_000, None);
        assert!(
            !first.contains("img/s") && !first.contains("MFU"),
            "{first}"
        );
        assert!(Rates::between(&now, &before, 1.0).is_none());
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration_text(44.6), "45s");
        assert_eq!(duration_text(725.0), "12m 05s");
        assert_eq!(duration_text(12_000.0), "3h 20m");
        assert_eq!(duration_text(18.2 * 86400.0), "18d 04h");
    }
}
