//! The live view: a line per function, redrawn in place on a terminal (indicatif), printed every
//! few seconds otherwise (CI logs, pipes), and the summary table at the end.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;

use crate::stats::MappingStats;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewMode {
    /// Redrawn lines when stderr is a terminal, else plain lines every 5 s.
    Auto,
    /// Plain lines every this often.
    Plain(Duration),
    None,
}

/// A line above the functions' lines (totals of the backends, elapsed time).
pub type Header = Arc<dyn Fn() -> String + Send + Sync>;

pub struct LiveView {
    task: Option<JoinHandle<()>>,
    stop: tokio::sync::watch::Sender<bool>,
}

/// One function's counters on one line.
pub fn line(name: &str, stats: &MappingStats, width: usize) -> String {
    let g = MappingStats::get;
    let mut out = format!(
        "{name:<width$} in {:>8}  out {:>8}  invokes {:>6}  errors {:>4}  retries {:>4}  bisects {:>4}  on-failure {:>4}",
        g(&stats.records_in),
        g(&stats.records_out),
        g(&stats.invokes),
        g(&stats.function_errors) + g(&stats.partial_failures),
        g(&stats.retries),
        g(&stats.bisects),
        g(&stats.discarded),
    );
    if g(&stats.filtered) > 0 {
        let _ = write!(out, "  filtered {}", g(&stats.filtered));
    }
    if g(&stats.windows_closed) > 0 || stats.open_windows.load(Ordering::Relaxed) > 0 {
        let _ = write!(out, "  windows closed {}", g(&stats.windows_closed));
    }
    let _ = write!(
        out,
        "  iterator age {} ms",
        stats.iterator_age_ms.load(Ordering::Relaxed).max(0)
    );
    out
}

impl std::fmt::Debug for LiveView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveView").finish_non_exhaustive()
    }
}

impl LiveView {
    pub fn start(
        mode: ViewMode,
        functions: Vec<(String, Arc<MappingStats>)>,
        header: Option<Header>,
    ) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let width = functions.iter().map(|(n, _)| n.len()).max().unwrap_or(8);
        let mode = match mode {
            ViewMode::Auto if std::io::stderr().is_terminal() => Some(None),
            ViewMode::Auto => Some(Some(Duration::from_secs(5))),
            ViewMode::Plain(every) => Some(Some(every)),
            ViewMode::None => None,
        };
        let task = mode.map(|plain| {
            tokio::spawn(async move {
                let bars = plain.is_none().then(|| {
                    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
                    let style = ProgressStyle::with_template("{spinner} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner());
                    let bars: Vec<ProgressBar> = std::iter::once(())
                        .chain(functions.iter().map(|_| ()))
                        .map(|()| {
                            let bar = multi.add(ProgressBar::new_spinner());
                            bar.set_style(style.clone());
                            bar
                        })
                        .collect();
                    (multi, bars)
                });
                let every = plain.unwrap_or(Duration::from_millis(250));
                // Bounded: ends when the run stops.
                loop {
                    let done = tokio::time::timeout(every, stopped.changed()).await.is_ok();
                    match &bars {
                        Some((_, bars)) => {
                            if let (Some(bar), Some(header)) = (bars.first(), &header) {
                                bar.set_message(header());
                                bar.tick();
                            }
                            for ((name, stats), bar) in functions.iter().zip(bars.iter().skip(1)) {
                                bar.set_message(line(name, stats, width));
                                bar.tick();
                            }
                        }
                        None => {
                            if let Some(header) = &header {
                                eprintln!("{}", header());
                            }
                            for (name, stats) in &functions {
                                eprintln!("{}", line(name, stats, width));
                            }
                        }
                    }
                    if done {
                        if let Some((_, bars)) = &bars {
                            for bar in bars {
                                bar.finish();
                            }
                        }
                        return;
                    }
                }
            })
        });
        Self { task, stop }
    }

    pub async fn finish(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// The end-of-run table.
pub fn summary(report: &crate::runner::RunReport) -> String {
    let g = MappingStats::get;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:>9} {:>9} {:>8} {:>7} {:>7} {:>7} {:>10} {:>8} {:>8}",
        "function",
        "read",
        "acked",
        "invokes",
        "errors",
        "retries",
        "bisects",
        "on-failure",
        "filtered",
        "windows"
    );
    for (name, stats) in &report.functions {
        let _ = writeln!(
            out,
            "{:<14} {:>9} {:>9} {:>8} {:>7} {:>7} {:>7} {:>10} {:>8} {:>8}",
            name,
            g(&stats.records_in),
            g(&stats.records_out),
            g(&stats.invokes),
            g(&stats.function_errors) + g(&stats.partial_failures),
            g(&stats.retries),
            g(&stats.bisects),
            g(&stats.discarded),
            g(&stats.filtered),
            g(&stats.windows_closed),
        );
    }
    out
}
