//! `--gpio /dev/gpiochipN:LINE`: the alert controller of `pe-clip-firmware` run inside the camera
//! loop, on the board's own GPIO lines (`linux-embedded-hal`'s character-device pins), for a car
//! with an LED (and optionally a buzzer, `--gpio-buzzer`) wired to the Jetson header instead of a
//! separate microcontroller. Same controller code, same states; the link is in-process, so it
//! is always alive while the loop runs, and a thread ticks the controller every 10 ms so that
//! the buzzer's pulse pattern keeps its timing between predictions.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use embedded_hal::digital::OutputPin;
use embedded_hal::pwm::SetDutyCycle;
use pe_clip_firmware::controller::AlertController;
use pe_clip_firmware::protocol::{Config, Message};

use crate::error::{Error, Result};

/// A GPIO line: chip device and line offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpioLine {
    pub chip: PathBuf,
    pub line: u32,
}

impl std::str::FromStr for GpioLine {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::usage(format!(
                "--gpio {s}: expected /dev/gpiochipN:LINE (e.g. /dev/gpiochip0:105)"
            ))
        };
        let (chip, line) = s.rsplit_once(':').ok_or_else(bad)?;
        if chip.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            chip: PathBuf::from(chip),
            line: line.trim().parse().map_err(|_| bad())?,
        })
    }
}

/// An on/off output as a duty cycle (any duty above zero switches it on): a buzzer or motor on a
/// plain GPIO line.
pub struct PinDuty<P>(pub P);

impl<P: OutputPin> embedded_hal::pwm::ErrorType for PinDuty<P> {
    type Error = embedded_hal::pwm::ErrorKind;
}

impl<P: OutputPin> SetDutyCycle for PinDuty<P> {
    fn max_duty_cycle(&self) -> u16 {
        100
    }

    fn set_duty_cycle(&mut self, duty: u16) -> std::result::Result<(), Self::Error> {
        let r = if duty > 0 {
            self.0.set_high()
        } else {
            self.0.set_low()
        };
        r.map_err(|_| embedded_hal::pwm::ErrorKind::Other)
    }
}

/// No buzzer wired.
pub struct NoBuzzer;

impl embedded_hal::pwm::ErrorType for NoBuzzer {
    type Error = std::convert::Infallible;
}

impl SetDutyCycle for NoBuzzer {
    fn max_duty_cycle(&self) -> u16 {
        100
    }

    fn set_duty_cycle(&mut self, _duty: u16) -> std::result::Result<(), Self::Error> {
        Ok(())
    }
}

/// The controller running in its own thread.
pub struct LocalAlert {
    tx: mpsc::SyncSender<Option<Message>>,
    handle: std::thread::JoinHandle<u64>,
}

impl LocalAlert {
    /// Start the controller on `led` and `buzzer` with `config`.
    pub fn start<L, B>(led: L, buzzer: B, config: Config) -> Result<Self>
    where
        L: OutputPin + Send + 'static,
        B: SetDutyCycle + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel::<Option<Message>>(64);
        let handle = std::thread::Builder::new()
            .name("pe-clip-alert".into())
            .spawn(move || {
                let start = Instant::now();
                let mut ctl = AlertController::new(led, buzzer, config);
                let mut errors = 0u64;
                loop {
                    let now = start.elapsed().as_millis() as u32;
                    // In-process: the link is alive for as long as this thread runs.
                    ctl.on_message(&Message::Heartbeat { seq: now }, now);
                    match rx.recv_timeout(Duration::from_millis(10)) {
                        Ok(Some(msg)) => ctl.on_message(&msg, now),
                        Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                    }
                    match ctl.tick(start.elapsed().as_millis() as u32) {
                        Ok(Some(Message::Alert { kind, level })) => {
                            log::info!("alert: {kind:?} level {level}");
                        }
                        Ok(_) => {}
                        Err(_) => {
                            errors += 1;
                            if errors == 1 {
                                log::warn!("alert output: a GPIO write failed");
                            }
                        }
                    }
                }
                // Leave the outputs off.
                let (mut led, mut buzzer) = ctl.release();
                let _ = led.set_low();
                let _ = buzzer.set_duty_cycle(0);
                errors
            })
            .map_err(|source| Error::Thread {
                name: "alert",
                source,
            })?;
        Ok(Self { tx, handle })
    }

    /// Hand a message (an expression) to the controller; never blocks.
    pub fn send(&self, msg: Message) {
        let _ = self.tx.try_send(Some(msg));
    }

    /// Stop, switch the outputs off, and return the number of failed output writes.
    pub fn finish(self) -> u64 {
        let _ = self.tx.send(None);
        self.handle.join().unwrap_or(0)
    }
}

/// Request `line` as an output (initially low) through the GPIO character device.
pub fn output_pin(line: &GpioLine) -> Result<linux_embedded_hal::CdevPin> {
    use linux_embedded_hal::gpio_cdev::{Chip, LineRequestFlags};
    let fail = |e: linux_embedded_hal::gpio_cdev::Error| {
        Error::device(format!("GPIO {}:{}", line.chip.display(), line.line), e)
    };
    let mut chip = Chip::new(&line.chip).map_err(fail)?;
    let handle = chip
        .get_line(line.line)
        .and_then(|l| l.request(LineRequestFlags::OUTPUT, 0, "pe-clip"))
        .map_err(fail)?;
    linux_embedded_hal::CdevPin::new(handle).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal_mock::eh1::digital::{Mock as Pin, State, Transaction as T};

    #[test]
    fn lines_parse_and_bad_ones_are_named() {
        let l: GpioLine = "/dev/gpiochip0:105".parse().unwrap();
        assert_eq!(l.chip, PathBuf::from("/dev/gpiochip0"));
        assert_eq!(l.line, 105);
        for bad in ["/dev/gpiochip0", ":3", "/dev/gpiochip0:x"] {
            let e = bad.parse::<GpioLine>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
        let missing = output_pin(&"/dev/no-gpiochip:1".parse().unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(missing.contains("/dev/no-gpiochip:1"), "{missing}");
    }

    #[test]
    fn a_pin_as_duty_is_on_for_any_duty() {
        let pin = Pin::new(&[T::set(State::High), T::set(State::Low), T::set(State::High)]);
        let mut d = PinDuty(pin);
        d.set_duty_cycle(30).unwrap();
        d.set_duty_cycle(0).unwrap();
        d.set_duty_cycle_percent(60).unwrap();
        d.0.done();
    }

    /// The threaded controller raises the LED for a sustained negative expression and leaves
    /// it off when stopped.
    #[test]
    fn local_alert_lights_the_led_and_switches_off_at_the_end() {
        let led = Pin::new(&[
            T::set(State::Low),  // idle (the in-process link is alive at once)
            T::set(State::High), // level 1
            T::set(State::Low),  // switched off at the end
        ]);
        let config = Config {
            hold_ms: 50,
            ..Config::default()
        };
        let alert = LocalAlert::start(led.clone(), NoBuzzer, config).unwrap();
        let anger = Message::Expression {
            class: 3,
            confidence_permille: 900,
            time_ms: 0,
        };
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(200) {
            alert.send(anger);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(alert.finish(), 0);
        let mut led = led;
        led.done();
    }
}
