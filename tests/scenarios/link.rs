//! End to end on the host: the runtime's events on a synthetic drive, encoded as the link sends
//! them, through a byte pipe that corrupts some frames and inserts garbage, decoded and fed to
//! the alert controller with recording pins.

use pe_clip::frames::source::{SynthSource, SynthStreamOptions};
use pe_clip::package::Package;
use pe_clip::runtime::events::Event;
use pe_clip::runtime::link::{controller_config, expression};
use pe_clip::runtime::{run, RunConfig};
use pe_clip_firmware::controller::{AlertController, Mode};
use pe_clip_firmware::protocol::{self, Config, Message, Sender, MAX_FRAME, PROTOCOL_VERSION};
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
