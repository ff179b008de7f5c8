//! Progress display for long steps (hidden when stderr is not a terminal).

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar or spinner on stderr.
#[derive(Debug, Clone)]
pub struct Progress(ProgressBar);

impl Progress {
    /// A bar over `total` units.
    pub fn bar(total: u64, message: &str) -> Self {
        let bar = ProgressBar::new(total);
        if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {percent}% ({elapsed})") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(message.to_owned());
        Self(bar)
    }

    /// A spinner for work of unknown length.
    pub fn spinner(message: &str) -> Self {
        let bar = ProgressBar::new_spinner();
        bar.set_message(message.to_owned());
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Self(bar)
    }

    /// Advances by `n` units.
    pub fn inc(&self, n: u64) {
        self.0.inc(n);
    }

    /// Replaces the message.
    pub fn set_message(&self, message: &str) {
        self.0.set_message(message.to_owned());
    }

    /// Removes the display.
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}
