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
        crate::error::Error::Input(format!(
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

/// End to end on the host: the runtime's events on a synthetic drive, encoded as the link sends
/// them, through a byte pipe that corrupts some frames and inserts garbage, decoded and fed to
/// the alert controller with recording pins.
#[cfg(test)]
mod end_to_end {
    use super::*;
    use crate::frames::source::{SynthSource, SynthStreamOptions};
    use crate::package::Package;
    use crate::runtime::events::Event;
    use crate::runtime::{run, RunConfig};
    use pe_clip_firmware::controller::{AlertController, Mode};
    use std::convert::Infallible;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[derive(Default)]
    struct Led(bool);
    impl embedded_hal::digital::ErrorType for Led {
        type Error = Infallible;
    }
    impl embedded_hal::digital::OutputPin for Led {
        fn set_low(&mut self) -> Result<(), Infallible> {
            self.0 = false;
            Ok(())
        }
        fn set_high(&mut self) -> Result<(), Infallible> {
            self.0 = true;
            Ok(())
        }
    }
    #[derive(Default)]
    struct Buzzer(u16);
    impl embedded_hal::pwm::ErrorType for Buzzer {
        type Error = Infallible;
    }
    impl embedded_hal::pwm::SetDutyCycle for Buzzer {
        fn max_duty_cycle(&self) -> u16 {
            100
        }
        fn set_duty_cycle(&mut self, duty: u16) -> Result<(), Infallible> {
            self.0 = duty;
            Ok(())
        }
    }

    fn events() -> (Vec<Event>, Vec<String>) {
        let package = Package::embedded_demo().unwrap();
        let mut model = package.step_model().unwrap();
        let cfg = RunConfig::for_package(&package);
        let source = SynthSource::new(SynthStreamOptions {
            frames: Some(2400),
            ..Default::default()
        })
        .unwrap();
        let mut events = Vec::new();
        let mut sink = |e: &Event| {
            events.push(e.clone());
            Ok(())
        };
        run(
            &package,
            &mut model,
            Box::new(source),
            &cfg,
            &mut sink,
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
        (events, package.class_names())
    }

    /// The wire: for each full event a heartbeat and an expression at the event's stream time.
    fn wire(events: &[Event], classes: &[String]) -> Vec<(u32, Message)> {
        let mut out = vec![(
            0,
            Message::Hello {
                protocol: PROTOCOL_VERSION,
                sender: Sender::CameraLoop,
            },
        )];
        for (i, e) in events.iter().filter(|e| !e.partial).enumerate() {
            let class = classes.iter().position(|c| *c == e.label).unwrap();
            let t = e.t_ms as u32;
            out.push((t, Message::Heartbeat { seq: i as u32 }));
            out.push((t, expression(class, e.confidence, e.t_ms)));
        }
        out
    }

    /// Feed timed messages through bytes (corrupting every `corrupt_every`-th frame, 0: none)
    /// to a controller; returns its mode after each message and what was accepted.
    fn drive(
        msgs: &[(u32, Message)],
        corrupt_every: usize,
        config: Config,
    ) -> (Vec<Mode>, usize, usize) {
        let mut ctl = AlertController::new(Led::default(), Buzzer::default(), config);
        let mut dec = protocol::Decoder::new();
        let (mut modes, mut accepted, mut rejected) = (Vec::new(), 0, 0);
        let mut rng = 0x2545_f491_u64;
        for (i, (t, msg)) in msgs.iter().enumerate() {
            let mut buf = [0u8; MAX_FRAME + 1];
            let n = protocol::encode_delimited(msg, &mut buf).unwrap();
            let mut bytes = buf[..n].to_vec();
            if corrupt_every > 0 && i % corrupt_every == corrupt_every - 1 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let k = 1 + (rng as usize) % (n - 2); // inside the frame, not its delimiters
                bytes[k] ^= 1 << (rng % 8);
                // And some line noise before the next frame.
                bytes.extend_from_slice(&[0x55, 0xaa, (rng >> 8) as u8]);
            }
            for b in bytes {
                match dec.push(b) {
                    Some(Ok(m)) => {
                        assert_eq!(m, *msg, "a corrupted frame was accepted");
                        accepted += 1;
                        ctl.on_message(&m, *t);
                    }
                    Some(Err(_)) => rejected += 1,
                    None => {}
                }
            }
            ctl.tick(*t).unwrap();
            modes.push(ctl.mode());
        }
        let (led, _) = ctl.release();
        // The LED agrees with the final mode (on in any alert level).
        if let Some(Mode::Active { level }) = modes.last() {
            assert_eq!(led.0, *level > 0);
        }
        (modes, accepted, rejected)
    }

    #[test]
    fn events_through_a_corrupting_pipe_drive_the_controller_like_a_clean_one() {
        let (events, classes) = events();
        let msgs = wire(&events, &classes);
        let config = controller_config(&classes).unwrap();
        let (clean, ok_clean, bad_clean) = drive(&msgs, 0, config);
        assert_eq!((ok_clean, bad_clean), (msgs.len(), 0));
        let levels: Vec<u8> = clean
            .iter()
            .filter_map(|m| match m {
                Mode::Active { level } => Some(*level),
                Mode::FailSafe => None,
            })
            .collect();
        assert!(
            levels.iter().any(|l| *l >= 1),
            "no alert on a drive with negative expressions"
        );
        assert_eq!(levels.last(), Some(&0), "{levels:?}");
        // Every 10th frame corrupted: those are rejected, the rest accepted unchanged, and the
        // controller follows the clean run on nearly every message.
        let (noisy, ok, bad) = drive(&msgs, 10, config);
        assert_eq!(ok, msgs.len() - msgs.len() / 10);
        assert!(bad >= msgs.len() / 10);
        let same = clean.iter().zip(&noisy).filter(|(a, b)| a == b).count();
        assert!(
            same as f64 >= 0.9 * clean.len() as f64,
            "{same} of {} states agree",
            clean.len()
        );
    }

    /// A package whose classes come in another order alerts on the same expressions: the
    /// controller's negative-class mask follows the class names, not fixed indices.
    #[test]
    fn a_permuted_class_order_alerts_on_the_same_expressions() {
        let (events, classes) = events();
        let reference = drive(
            &wire(&events, &classes),
            0,
            controller_config(&classes).unwrap(),
        )
        .0;
        // The same model with its classes listed in another order (logits permuted alike).
        let mut permuted = classes.clone();
        permuted.rotate_left(3);
        let msgs = wire(&events, &permuted);
        let derived = drive(&msgs, 0, controller_config(&permuted).unwrap()).0;
        assert_eq!(derived, reference);
        // The fixed mask of the reference order would alert on other classes here.
        let fixed = drive(&msgs, 0, Config::default()).0;
        assert_ne!(fixed, reference);
    }

    #[test]
    fn a_negative_class_past_the_mask_is_a_clear_error() {
        let mut classes: Vec<String> = (0..16).map(|i| format!("c{i}")).collect();
        classes.push("anger".into());
        let e = controller_config(&classes).unwrap_err().to_string();
        assert!(e.contains("\"anger\" (index 16)"), "{e}");
    }
}
