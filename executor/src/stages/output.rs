//! The stage's output on its way to gitlab-runner: a dedicated thread writes each frame
//! to stdout or stderr (and flushes it, so a progress line without a newline shows at
//! once) while the stage reads the next one from the machine. Bounded
//! ([`QUEUED_FRAMES`]), so a slow reader holds memory flat and backs up to dockerd.

use std::io::Write;

use bytes::Bytes;
use tokio::sync::mpsc;

/// Frames in flight between the network and the writer thread.
const QUEUED_FRAMES: usize = 32;

#[derive(Debug, Clone, Copy)]
pub(super) enum Stream {
    Out,
    Err,
}

pub(super) struct Output {
    tx: mpsc::Sender<(Stream, Bytes)>,
    writer: std::thread::JoinHandle<std::io::Result<()>>,
}

impl Output {
    pub(super) fn start() -> std::io::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<(Stream, Bytes)>(QUEUED_FRAMES);
        let writer = std::thread::Builder::new()
            .name("stage-output".into())
            .spawn(move || {
                let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
                while let Some((stream, bytes)) = rx.blocking_recv() {
                    match stream {
                        Stream::Out => {
                            let mut out = stdout.lock();
                            out.write_all(&bytes)?;
                            out.flush()?;
                        }
                        Stream::Err => {
                            let mut err = stderr.lock();
                            err.write_all(&bytes)?;
                            err.flush()?;
                        }
                    }
                }
                Ok(())
            })?;
        Ok(Self { tx, writer })
    }

    /// Queues one frame; an error once the writer has stopped (stdout closed).
    pub(super) async fn send(&self, stream: Stream, bytes: Bytes) -> std::io::Result<()> {
        if self.tx.send((stream, bytes)).await.is_ok() {
            return Ok(());
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "the stage's output could not be written",
        ))
    }

    /// Waits until every queued frame is written; the writer's error if it stopped.
    pub(super) async fn finish(self) -> std::io::Result<()> {
        drop(self.tx);
        let writer = self.writer;
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .map_err(std::io::Error::other)?
            .map_err(|_| std::io::Error::other("the stage's output writer panicked"))?
    }
}
