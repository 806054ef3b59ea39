//! The alert link: expression events and heartbeats to the alert controller as protocol frames
//! (`pe-clip-firmware::protocol`), over a serial port (`--link /dev/ttyXXX`) or any byte sink.
//!
//! The link runs in its own thread so that a slow or absent port never holds up the camera loop:
//! events are handed over through a channel and dropped (counted) if the thread is behind. A
//! write that fails closes the port; it is reopened with back-off (0.5 s doubling to 5 s) while
//! the loop goes on. Each (re)connection starts with `Hello` and `Config`; every frame is preceded
//! by a delimiter, so a half frame or line noise on the other side spoils nothing but itself.

use std::io::Write;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pe_clip_firmware::protocol::{self, Config, Message, Sender, MAX_FRAME, PROTOCOL_VERSION};

/// Opens the byte sink (again, after a failure).
pub type Opener = Box<dyn FnMut() -> std::io::Result<Box<dyn Write + Send>> + Send>;

/// Link settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkOptions {
    /// Time between heartbeats.
    pub heartbeat: Duration,
    /// The controller's configuration, sent on every connection.
    pub config: Config,
    /// First wait before reopening a failed port (doubles up to 5 s).
    pub retry: Duration,
}

impl Default for LinkOptions {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(500),
            config: Config::default(),
            retry: Duration::from_millis(500),
        }
    }
}

/// The alert controller's configuration for a model with classes `classes` (logit order): the
/// negative-class mask is derived from the class names (`protocol::NEGATIVE_CLASSES`), so a
/// package with another class order alerts on the same expressions.
pub fn controller_config(classes: &[String]) -> crate::error::Result<Config> {
    Config::for_classes(classes.iter().map(String::as_str)).map_err(|e| {
        crate::error::Error::usage(format!(
            "class {:?} (index {}) counts as negative, but the alert link's class mask holds \
             classes 0 to 15 only",
            classes[e.index], e.index
        ))
    })
}

/// What the link did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub frames: u64,
    pub expressions: u64,
    pub heartbeats: u64,
    /// Events not sent because the port was closed or the link thread was behind.
    pub dropped: u64,
    pub connects: u64,
    pub write_errors: u64,
}

enum Cmd {
    Send(Message),
    Stop,
}

/// A running link.
pub struct Link {
    tx: mpsc::SyncSender<Cmd>,
    handle: std::thread::JoinHandle<LinkStats>,
    dropped: u64,
}

/// The protocol message of one event: class index, confidence in per mille, stream time.
pub fn expression(class: usize, confidence: f32, t_ms: f64) -> Message {
    Message::Expression {
        class: class.min(255) as u8,
        confidence_permille: (confidence.clamp(0.0, 1.0) * 1000.0).round() as u16,
        time_ms: (t_ms.max(0.0) as u64 % (1u64 << 32)) as u32,
    }
}

struct Port {
    name: String,
    opener: Opener,
    out: Option<Box<dyn Write + Send>>,
    opts: LinkOptions,
    stats: LinkStats,
    retry_at: Instant,
    backoff: Duration,
}

impl Port {
    fn write(&mut self, msg: &Message) -> bool {
        let Some(out) = self.out.as_mut() else {
            return false;
        };
        let mut buf = [0u8; MAX_FRAME + 1];
        let n = match protocol::encode_delimited(msg, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                log::error!("link {}: cannot encode {msg:?}: {e:?}", self.name);
                return false;
            }
        };
        match out.write_all(&buf[..n]).and_then(|()| out.flush()) {
            Ok(()) => {
                self.stats.frames += 1;
                true
            }
            Err(e) => {
                log::warn!("link {}: write failed ({e}); reopening", self.name);
                self.stats.write_errors += 1;
                self.out = None;
                self.retry_at = Instant::now() + self.backoff;
                false
            }
        }
    }

    fn ensure_open(&mut self) {
        if self.out.is_some() || Instant::now() < self.retry_at {
            return;
        }
        match (self.opener)() {
            Ok(out) => {
                self.out = Some(out);
                self.stats.connects += 1;
                self.backoff = self.opts.retry;
                log::info!("link {}: connected", self.name);
                let hello = Message::Hello {
                    protocol: PROTOCOL_VERSION,
                    sender: Sender::CameraLoop,
                };
                let config = Message::Config(self.opts.config);
                let _ = self.write(&hello) && self.write(&config);
            }
            Err(e) => {
                log::warn!(
                    "link {}: cannot open ({e}); retrying in {:.1} s",
                    self.name,
                    self.backoff.as_secs_f64()
                );
                self.retry_at = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

impl Link {
    /// Start the link thread; `name` is for messages.
    pub fn start(name: &str, opener: Opener, opts: LinkOptions) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Cmd>(64);
        let mut port = Port {
            name: name.to_string(),
            opener,
            out: None,
            opts,
            stats: LinkStats::default(),
            retry_at: Instant::now(),
            backoff: opts.retry,
        };
        let handle = std::thread::Builder::new()
            .name("pe-clip-link".into())
            .spawn(move || {
                let mut seq = 0u32;
                let mut next_beat = Instant::now();
                loop {
                    port.ensure_open();
                    if Instant::now() >= next_beat {
                        if port.write(&Message::Heartbeat { seq }) {
                            port.stats.heartbeats += 1;
                        }
                        seq = seq.wrapping_add(1);
                        next_beat = next_heartbeat(next_beat, opts.heartbeat, Instant::now());
                    }
                    let wait = next_beat.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(wait) {
                        Ok(Cmd::Send(msg)) => {
                            if port.write(&msg) {
                                port.stats.expressions += 1;
                            } else {
                                port.stats.dropped += 1;
                            }
                        }
                        Ok(Cmd::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                    }
                }
                port.stats
            })?;
        Ok(Self {
            tx,
            handle,
            dropped: 0,
        })
    }

    /// Queue a message; never blocks (a full queue drops it, counted).
    pub fn send(&mut self, msg: Message) {
        if self.tx.try_send(Cmd::Send(msg)).is_err() {
            self.dropped += 1;
        }
    }

    /// Stop the thread and return what it did.
    pub fn finish(self) -> LinkStats {
        let _ = self.tx.send(Cmd::Stop);
        let mut stats = self.handle.join().unwrap_or_default();
        stats.dropped += self.dropped;
        stats
    }
}

/// An opener for a serial port at `baud` (8N1).
pub fn serial_opener(path: String, baud: u32) -> Opener {
    Box::new(move || {
        let port = serialport::new(&path, baud)
            .timeout(Duration::from_millis(200))
            .open()
            .map_err(std::io::Error::other)?;
        Ok(Box::new(port) as Box<dyn Write + Send>)
    })
}

/// When the heartbeat after the one due at `due` is due: a period later, but never in the past,
/// so a link thread that stalled (a blocking write) sends one heartbeat and goes on at its pace
/// instead of a burst that catches up.
fn next_heartbeat(due: Instant, period: Duration, now: Instant) -> Instant {
    (due + period).max(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A byte pipe that can be made to fail and reopened.
    #[derive(Clone, Default)]
    struct Pipe {
        bytes: Arc<Mutex<Vec<u8>>>,
        broken: Arc<Mutex<bool>>,
    }

    impl Write for Pipe {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if *self.broken.lock().unwrap() {
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            self.bytes.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn decode_all(bytes: &[u8]) -> Vec<Message> {
        let mut dec = protocol::Decoder::new();
        bytes
            .iter()
            .filter_map(|b| dec.push(*b))
            .map(|r| r.expect("every frame checks"))
            .collect()
    }

    #[test]
    fn heartbeats_skip_ahead_after_a_stall() {
        let t0 = Instant::now();
        let p = Duration::from_millis(500);
        assert_eq!(next_heartbeat(t0, p, t0), t0 + p);
        // Three seconds late: the next one is due now, then every period again.
        let late = t0 + Duration::from_secs(3);
        assert_eq!(next_heartbeat(t0, p, late), late);
        assert_eq!(next_heartbeat(late, p, late), late + p);
    }

    #[test]
    fn events_and_heartbeats_go_out_and_a_broken_port_is_reopened() {
        let pipe = Pipe::default();
        let opens = Arc::new(Mutex::new(0));
        let opener: Opener = {
            let (pipe, opens) = (pipe.clone(), opens.clone());
            Box::new(move || {
                *opens.lock().unwrap() += 1;
                if *pipe.broken.lock().unwrap() {
                    // Unplugged: the device node is gone too.
                    return Err(std::io::Error::other("no such device"));
                }
                Ok(Box::new(pipe.clone()) as Box<dyn Write + Send>)
            })
        };
        let opts = LinkOptions {
            heartbeat: Duration::from_millis(20),
            retry: Duration::from_millis(10),
            ..Default::default()
        };
        let wait_until = |what: &str, cond: &dyn Fn() -> bool| {
            let start = Instant::now();
            while !cond() {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "timed out: {what}"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let count = |f: fn(&Message) -> bool| {
            decode_all(&pipe.bytes.lock().unwrap())
                .iter()
                .filter(|m| f(m))
                .count()
        };
        let mut link = Link::start("pipe", opener, opts).unwrap();
        link.send(expression(3, 0.87, 1500.0));
        wait_until("first expression", &|| {
            count(|m| matches!(m, Message::Expression { .. })) == 1
        });
        *pipe.broken.lock().unwrap() = true;
        // A heartbeat write fails, then a reopen fails: the link has noticed.
        wait_until("a failed reopen", &|| *opens.lock().unwrap() >= 2);
        *pipe.broken.lock().unwrap() = false;
        wait_until("reconnection", &|| {
            count(|m| matches!(m, Message::Hello { .. })) == 2
        });
        link.send(expression(6, 0.99, 1700.0));
        wait_until("last expression", &|| {
            count(|m| matches!(m, Message::Expression { .. })) == 2
        });
        wait_until("heartbeats", &|| {
            count(|m| matches!(m, Message::Heartbeat { .. })) >= 3
        });
        let stats = link.finish();
        let msgs = decode_all(&pipe.bytes.lock().unwrap());
        let hellos = msgs
            .iter()
            .filter(|m| matches!(m, Message::Hello { .. }))
            .count();
        assert_eq!(hellos as u64, stats.connects);
        assert_eq!(stats.connects, 2, "{stats:?}");
        assert!(*opens.lock().unwrap() >= 3);
        assert!(stats.write_errors >= 1);
        assert!(stats.heartbeats >= 3, "{stats:?}");
        let expr: Vec<&Message> = msgs
            .iter()
            .filter(|m| matches!(m, Message::Expression { .. }))
            .collect();
        assert_eq!(
            expr,
            [&expression(3, 0.87, 1500.0), &expression(6, 0.99, 1700.0)]
        );
        assert!(matches!(msgs[1], Message::Config(_)), "{msgs:?}");
    }

    #[test]
    fn expressions_are_clamped_into_the_wire_ranges() {
        assert_eq!(
            expression(900, 1.7, -5.0),
            Message::Expression {
                class: 255,
                confidence_permille: 1000,
                time_ms: 0
            }
        );
    }
}
