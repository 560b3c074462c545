//! The diagnostic log's writer: lines go to a bounded queue and a thread of
//! their own writes them to stderr, so a slow or blocked stderr (a full
//! pipe, a stalled log collector) never stalls the task that logs. When the
//! queue is full a line is dropped and counted
//! (`snigress_log_dropped_lines_total`); the access log is separate and is
//! never dropped this way.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Lines waiting to be written; at ~200 bytes each about 1 MiB.
pub const QUEUE_LINES: usize = 4096;

/// Lines dropped because the queue was full, since the process started.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Lines dropped so far (one stderr per process, so one count).
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The writer to give `tracing_subscriber::fmt().with_writer(..)`.
#[derive(Clone)]
pub struct NonBlockingStderr {
    queue: SyncSender<Vec<u8>>,
    progress: Arc<Progress>,
}

/// Lines queued and written, for [`NonBlockingStderr::flush`].
#[derive(Default)]
struct Progress {
    counts: Mutex<(u64, u64)>,
    written: Condvar,
}

impl NonBlockingStderr {
    /// Starts the writer thread.
    pub fn spawn() -> io::Result<NonBlockingStderr> {
        let (queue, lines) = sync_channel(QUEUE_LINES);
        let progress = Arc::new(Progress::default());
        let writer = progress.clone();
        std::thread::Builder::new().name("stderr".into()).spawn(move || write_loop(&lines, &writer))?;
        Ok(NonBlockingStderr { queue, progress })
    }

    /// Waits, at most `timeout`, until every line queued so far is written.
    pub fn flush(&self, timeout: Duration) {
        let counts = self.progress.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let want = counts.0;
        let _ = self
            .progress
            .written
            .wait_timeout_while(counts, timeout, |(_, written)| *written < want)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
}

fn write_loop(lines: &Receiver<Vec<u8>>, progress: &Progress) {
    let mut err = io::stderr();
    for line in lines {
        // Nowhere left to report a failure to write stderr.
        let _ = err.write_all(&line);
        let mut counts = progress.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        counts.1 += 1;
        progress.written.notify_all();
    }
}

impl<'a> MakeWriter<'a> for NonBlockingStderr {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line { to: self, buf: Vec::new() }
    }
}

/// One formatted event, queued as a whole when the formatter is done with it.
pub struct Line<'a> {
    to: &'a NonBlockingStderr,
    buf: Vec<u8>,
}

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let mut counts = self.to.progress.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match self.to.queue.try_send(std::mem::take(&mut self.buf)) {
            Ok(()) => counts.0 += 1,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
