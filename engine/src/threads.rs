//! How many libtorch intra-op threads a process uses. libtorch's default is every core of the node, for every
//! process: four ranks on a node each start a thread per core, and on a small model the threads spend more time
//! meeting at barriers than computing, worst when anything else holds a core. The choice here takes the cores this
//! process may use (its affinity and cgroup quota), shares them among the node's ranks, and gives small work fewer
//! threads than that.

use radit_protocol::env::local_placement;

/// Work below this many floating-point operations per thread per step is given no further thread: on a small step
/// a second thread gains little on an idle machine and loses badly when another process holds a core (the threads
/// meet at every operation's barrier). Measured (BENCHMARKS.md, "Threads"): the README's tiny run (1.43 GFLOP a
/// step) 1.5x faster on two threads idle, 1.6x slower with a core busy; the SCM example 3.8x slower.
pub const MIN_FLOPS_PER_THREAD: f64 = 4e9;

/// The intra-op threads chosen, and why (printed by the command that chose them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadChoice {
    pub threads: usize,
    pub why: String,
}

/// What the choice depends on, all of it given so that the rule is a pure function.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThreadInputs {
    /// `--threads`, when given: used as it is.
    pub requested: Option<usize>,
    /// Cores this process may run on.
    pub cores: usize,
    /// Ranks (processes) sharing those cores on this node.
    pub local_ranks: usize,
    /// Floating-point operations of one step of the work (a training step, one batch of inference), when known.
    pub flops_per_step: Option<f64>,
}

/// The rule: `--threads` as given; else the node's cores shared among its ranks, and no more than the work can
/// keep busy.
pub fn choose(i: ThreadInputs) -> ThreadChoice {
    if let Some(n) = i.requested {
        return ThreadChoice {
            threads: n.max(1),
            why: "--threads".into(),
        };
    }
    let ranks = i.local_ranks.max(1);
    let share = (i.cores / ranks).max(1);
    let shared = if ranks > 1 {
        format!("{} cores over {ranks} ranks on this node", i.cores)
    } else {
        format!("{} cores", i.cores)
    };
    match i.flops_per_step {
        Some(flops) if flops.is_finite() && flops >= 0.0 => {
            let useful = ((flops / MIN_FLOPS_PER_THREAD).floor() as usize).max(1);
            if useful < share {
                ThreadChoice {
                    threads: useful,
                    why: format!(
                        "{shared}; {:.2} GFLOP a step keeps {useful} busy (--threads to override)",
                        flops / 1e9
                    ),
                }
            } else {
                ThreadChoice {
                    threads: share,
                    why: format!("{shared} (--threads to override)"),
                }
            }
        }
        _ => ThreadChoice {
            threads: share,
            why: format!("{shared} (--threads to override)"),
        },
    }
}

/// The cores this process may use: its CPU affinity and cgroup quota, as the standard library reads them.
pub fn usable_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The ranks on this node as the launcher says (mpirun, srun, `radit run`), else 1.
pub fn local_ranks() -> usize {
    local_placement(|k| std::env::var(k).ok())
        .local_size
        .unwrap_or(1)
}

/// Chooses for this process and applies the choice to libtorch (intra-op; inter-op stays at one thread per
/// process's share, since radit's graphs run one operation at a time).
pub fn apply(requested: Option<usize>, flops_per_step: Option<f64>) -> ThreadChoice {
    let choice = choose(ThreadInputs {
        requested,
        cores: usable_cores(),
        local_ranks: local_ranks(),
        flops_per_step,
    });
    let n = i32::try_from(choice.threads).unwrap_or(i32::MAX);
    radit_models::tch::set_num_threads(n);
    tracing::info!(threads = choice.threads, why = %choice.why, "libtorch intra-op threads");
    choice
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(
        requested: Option<usize>,
        cores: usize,
        ranks: usize,
        gflop: Option<f64>,
    ) -> ThreadInputs {
        ThreadInputs {
            requested,
            cores,
            local_ranks: ranks,
            flops_per_step: gflop.map(|g| g * 1e9),
        }
    }

    #[test]
    fn the_flag_wins_then_the_share_then_the_work() {
        assert_eq!(choose(inputs(Some(3), 2, 1, Some(0.1))).threads, 3);
        // A big step on a whole node: every core.
        assert_eq!(choose(inputs(None, 72, 1, Some(1e4))).threads, 72);
        // Four ranks on a 288-core GH200 node: a quarter each, never the whole node.
        assert_eq!(choose(inputs(None, 288, 4, Some(1e6))).threads, 72);
        // More ranks than cores: one each.
        assert_eq!(choose(inputs(None, 2, 4, None)).threads, 1);
        // The README's tiny CPU run (1.43 GFLOP a step) on 2 cores: one thread.
        let tiny = choose(inputs(None, 2, 1, Some(1.43)));
        assert_eq!(tiny.threads, 1);
        assert!(tiny.why.contains("GFLOP"), "{}", tiny.why);
        // Mid-sized work: as many threads as it keeps busy.
        assert_eq!(choose(inputs(None, 16, 1, Some(10.0))).threads, 2);
        // Unknown work: the share.
        assert_eq!(choose(inputs(None, 8, 2, None)).threads, 4);
    }
}
