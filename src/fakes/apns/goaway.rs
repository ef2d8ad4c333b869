//! Writes a GOAWAY with a chosen last-stream-id into a server's outgoing HTTP/2 byte stream.
//!
//! Neither hyper nor h2 can send a GOAWAY whose last-stream-id is below a stream they already
//! received, yet that is exactly the case a client must survive (resend what was not processed).
//! This wrapper sits between h2 and the socket, follows the outgoing frame boundaries, and slips
//! the frame in between two whole frames.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Handle for asking the wrapped connection to send a GOAWAY.
///
/// Call [`GoAwaySwitch::send`] from the task driving the h2 connection: h2 flushes every time it
/// is polled, and the frame goes out on that flush.
#[derive(Debug, Default)]
pub(super) struct GoAwaySwitch {
    // Checked on every write; the mutex is only touched once armed.
    armed: AtomicBool,
    pending: Mutex<Option<Vec<u8>>>,
}

impl GoAwaySwitch {
    /// Queues a GOAWAY(NO_ERROR, `last_stream_id`) with Apple's `Shutdown` reason as debug data.
    pub(super) fn send(&self, last_stream_id: u32) {
        let debug = br#"{"reason":"Shutdown"}"#;
        let len = 8 + debug.len();
        let mut frame = Vec::with_capacity(9 + len);
        frame.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
        frame.push(0x7); // GOAWAY
        frame.push(0); // flags
        frame.extend_from_slice(&0u32.to_be_bytes()); // stream 0
        frame.extend_from_slice(&(last_stream_id & 0x7fff_ffff).to_be_bytes());
        frame.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR
        frame.extend_from_slice(debug);
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(frame);
        self.armed.store(true, Ordering::Release);
    }

    fn take(&self) -> Option<Vec<u8>> {
        if !self.armed.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// The IO wrapper; reads pass through.
pub(super) struct GoAwayIo<T> {
    inner: T,
    switch: Arc<GoAwaySwitch>,
    injecting: Vec<u8>,
    injected: usize,
    header: [u8; 9],
    header_len: usize,
    payload_left: usize,
}

impl<T> GoAwayIo<T> {
    pub(super) fn new(inner: T, switch: Arc<GoAwaySwitch>) -> Self {
        Self {
            inner,
            switch,
            injecting: Vec::new(),
            injected: 0,
            header: [0; 9],
            header_len: 0,
            payload_left: 0,
        }
    }

    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.payload_left == 0
    }

    /// Follows frame headers (9 bytes, 24-bit payload length first) over written bytes.
    fn track(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            self.header[self.header_len] = bytes[0];
            self.header_len += 1;
            bytes = &bytes[1..];
            if self.header_len == 9 {
                self.header_len = 0;
                self.payload_left =
                    u32::from_be_bytes([0, self.header[0], self.header[1], self.header[2]])
                        as usize;
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> GoAwayIo<T> {
    /// Writes any queued GOAWAY, but only between frames.
    fn poll_inject(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.injecting.is_empty() && self.at_boundary() {
            match self.switch.take() {
                Some(frame) => {
                    self.injecting = frame;
                    self.injected = 0;
                }
                None => return Poll::Ready(Ok(())),
            }
        }
        while self.injected < self.injecting.len() {
            let n = std::task::ready!(
                Pin::new(&mut self.inner).poll_write(cx, &self.injecting[self.injected..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.injected += n;
        }
        self.injecting.clear();
        self.injected = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GoAwayIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GoAwayIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_inject(cx))?;
        let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.track(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_inject(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_frames_split_across_writes() {
        let mut io = GoAwayIo::new(Vec::<u8>::new(), Arc::default());
        // A 3-byte DATA frame header + payload, written in odd pieces.
        let frame = [0, 0, 3, 0, 1, 0, 0, 0, 1, b'a', b'b', b'c'];
        io.track(&frame[..4]);
        assert!(!io.at_boundary());
        io.track(&frame[4..10]);
        assert!(!io.at_boundary());
        io.track(&frame[10..]);
        assert!(io.at_boundary());
        // An empty-payload frame (SETTINGS ACK).
        io.track(&[0, 0, 0, 4, 1, 0, 0, 0, 0]);
        assert!(io.at_boundary());
    }
}
