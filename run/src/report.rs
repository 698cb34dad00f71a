//! What `radit run` tells the person watching: a periodic line (step, loss, images/s, tokens/s, MFU, ETA) and, on
//! a terminal, a progress bar under the lines. Rates are over the ranks' busy time since the previous line (or
//! since this generation's first step), never the supervisor's wall clock, which a heartbeat's lag skews.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use radit_coordinator::Totals;

/// The periodic line and the progress bar of one supervised run.
pub struct Reporter {
    bar: Option<ProgressBar>,
    total_steps: u64,
    /// Peak FLOP/s of the whole job, for MFU.
    peak_flops: Option<f64>,
    previous: Option<Totals>,
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
        let rates = Rates::between(self.previous.as_ref(), &now);
        let line = progress_line(&now, rates.as_ref(), self.total_steps, self.peak_flops);
        self.say(&format!("radit: {line} [generation {generation}]"));
        if let Some(bar) = &self.bar {
            bar.set_position(now.step);
            bar.set_message(
                eta_text(&now, self.total_steps).map_or(String::new(), |e| format!("ETA {e}")),
            );
        }
        self.previous = counted.then_some(now);
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
    /// Over the busy time between `before` and `now` when both are of one generation with every rank reporting;
    /// after a relaunch (or with no earlier line), over this generation's whole busy time. `None` until every
    /// rank of the generation has reported a step, or when no busy time passed.
    pub fn between(before: Option<&Totals>, now: &Totals) -> Option<Self> {
        let (p, q) = (before.map(|b| &b.pace), &now.pace);
        if q.world == 0 || q.ranks < q.world {
            return None;
        }
        let base = p
            .filter(|p| {
                p.generation == q.generation
                    && p.ranks == q.ranks
                    && p.busy_seconds < q.busy_seconds
            })
            .copied()
            .unwrap_or(radit_coordinator::Pace::default());
        let seconds = q.busy_seconds - base.busy_seconds;
        if seconds <= 0.0 || q.images < base.images {
            return None;
        }
        Some(Self {
            images_per_second: (q.images - base.images) / seconds,
            tokens_per_second: (q.tokens - base.tokens) / seconds,
            flops_per_second: (q.model_flops - base.model_flops) / seconds,
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
    use radit_coordinator::Pace;

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
            pace: Pace::default(),
        }
    }

    /// Two ranks of one generation, each having done `steps` steps of 16 images at `seconds` a step.
    fn paced(generation: u64, steps: [u64; 2], seconds: f64) -> Totals {
        let images = (steps[0] + steps[1]) as f64 * 16.0;
        Totals {
            pace: Pace {
                generation,
                ranks: 2,
                world: 2,
                images,
                tokens: images * 64.0,
                model_flops: images * 1e9,
                busy_seconds: (steps[0] + steps[1]) as f64 / 2.0 * seconds,
            },
            ..totals(steps[0].min(steps[1]), images, images * 1e9)
        }
    }

    #[test]
    fn the_line_carries_step_loss_rates_mfu_and_eta() {
        let before = paced(1, [1000, 1000], 1.0 / 16.0);
        let now = Totals {
            median_step_seconds: Some(2.31),
            ..paced(1, [1200, 1200], 1.0 / 16.0)
        };
        let rates = Rates::between(Some(&before), &now).expect("busy time passed");
        assert_eq!(rates.images_per_second, 512.0);
        let now = Totals {
            step: 1200,
            ..totals(1200, 614_400.0, 1e15)
        };
        let line = progress_line(&now, Some(&rates), 3_000_000, Some(512e9 / 0.205));
        assert_eq!(
            line,
            "step 1200/3000000 (0.0%) loss 0.4123 (max 0.4310) | 512 img/s 32.8k tok/s MFU 20.5% | 2.31 s/step \
             ETA 80d 04h | checkpoint 1000 | val loss 0.3987 @1000 FD 12.35 @1000"
        );
        // Without rates there are none in the line, and without a peak no MFU.
        let first = progress_line(&now, None, 3_000_000, None);
        assert!(
            !first.contains("img/s") && !first.contains("MFU"),
            "{first}"
        );
    }

    /// The rate is the ranks' own, whatever the supervisor's clock says: 2 ranks of 16 images at 0.1 s a step
    /// make 320 img/s on a line after stale heartbeats, on the last line (a fresh goodbye), with one rank a step
    /// behind the other, and on the first line of a relaunched generation.
    #[test]
    fn rates_hold_on_the_last_line_and_after_a_relaunch() {
        let truth = 320.0;
        let close = |r: Option<Rates>, what: &str| {
            let r = r.unwrap_or_else(|| panic!("{what}: no rate"));
            assert!(
                (r.images_per_second / truth - 1.0).abs() < 0.02,
                "{what}: {} img/s",
                r.images_per_second
            );
        };
        // The first line of a generation: its whole busy time.
        let stale = paced(1, [50, 49], 0.1);
        close(Rates::between(None, &stale), "first line");
        // The last line: the goodbye beats are fresh, the line before them a beat stale.
        let last = paced(1, [300, 300], 0.1);
        close(Rates::between(Some(&stale), &last), "last line");
        // A relaunch resumes from a checkpoint: the new generation's counters start at zero, its rate too.
        let relaunched = paced(2, [20, 20], 0.1);
        close(Rates::between(Some(&last), &relaunched), "relaunched");
        // Until every rank of a generation reported, there is no rate (one rank's counters are half the job's).
        let half = Totals {
            pace: Pace {
                ranks: 1,
                ..relaunched.pace
            },
            ..relaunched.clone()
        };
        assert!(Rates::between(Some(&last), &half).is_none());
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration_text(44.6), "45s");
        assert_eq!(duration_text(725.0), "12m 05s");
        assert_eq!(duration_text(12_000.0), "3h 20m");
        assert_eq!(duration_text(18.2 * 86400.0), "18d 04h");
    }
}
