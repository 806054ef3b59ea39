//! The alert controller: messages from the camera loop in, an LED and a buzzer (or haptic motor)
//! out, driven by a millisecond tick. Generic over embedded-hal 1.0 ([`OutputPin`],
//! [`SetDutyCycle`]), so the same code runs on a microcontroller and, through
//! `linux-embedded-hal`, on the camera board's own GPIO.
//!
//! - A negative expression (a class in `negative_classes` at or above `threshold_permille`)
//!   sustained for `hold_ms` raises level 1, `2 · hold_ms` level 2, `3 · hold_ms` level 3.
//! - Recovery has hysteresis: only predictions clearly below (a non-negative class, or confidence
//!   under the threshold minus [`CLEAR_MARGIN_PERMILLE`]) count toward clearing, and the alert
//!   clears after `2 · hold_ms` of them; predictions in between hold the state.
//! - No heartbeat for `heartbeat_timeout_ms` (or none yet) is the fail-safe state: the alert is
//!   dropped, the LED blinks (100 ms on, 900 ms off) and the buzzer stays silent, a pattern
//!   no alert level uses.
//!
//! Outputs per state: idle: LED off, buzzer off; level 1: LED on; level 2: LED on, buzzer at
//! 30 % for 200 ms of every second; level 3: LED on, buzzer at 60 % continuously.

use embedded_hal::digital::OutputPin;
use embedded_hal::pwm::SetDutyCycle;

use crate::protocol::{AlertKind, Config, Message};

/// How far under the threshold a negative class must fall to count toward clearing.
pub const CLEAR_MARGIN_PERMILLE: u16 = 100;

/// What the controller is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Link alive; `level` 0 (no alert) to 3.
    Active { level: u8 },
    /// No heartbeat: the link (or the camera loop) is down.
    FailSafe,
}

/// A pin or PWM write failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputError<L, B> {
    Led(L),
    Buzzer(B),
}

/// The controller and its outputs.
pub struct AlertController<L, B> {
    led: L,
    buzzer: B,
    max_duty: u16,
    config: Config,
    mode: Mode,
    last_heartbeat: Option<u32>,
    negative_since: Option<u32>,
    clear_since: Option<u32>,
    /// Output state last written (None: not yet).
    led_on: Option<bool>,
    duty: Option<u16>,
}

impl<L: OutputPin, B: SetDutyCycle> AlertController<L, B> {
    /// A controller in the fail-safe state (no heartbeat yet); reads the buzzer's maximum duty
    /// once.
    pub fn new(led: L, buzzer: B, config: Config) -> Self {
        let max_duty = buzzer.max_duty_cycle();
        Self {
            led,
            buzzer,
            max_duty,
            config,
            mode: Mode::FailSafe,
            last_heartbeat: None,
            negative_since: None,
            clear_since: None,
            led_on: None,
            duty: None,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Give the outputs back (tests check their mocks).
    pub fn release(self) -> (L, B) {
        (self.led, self.buzzer)
    }

    /// Take one message received at `now_ms`.
    pub fn on_message(&mut self, msg: &Message, now_ms: u32) {
        match *msg {
            Message::Heartbeat { .. } | Message::Hello { .. } => {
                self.last_heartbeat = Some(now_ms);
            }
            Message::Config(c) => self.config = c,
            Message::Expression {
                class,
                confidence_permille,
                ..
            } => {
                let negative_class =
                    class < 16 && self.config.negative_classes & (1u16 << class) != 0;
                let t = self.config.threshold_permille;
                if negative_class && confidence_permille >= t {
                    self.negative_since.get_or_insert(now_ms);
                    self.clear_since = None;
                } else if !negative_class
                    || confidence_permille < t.saturating_sub(CLEAR_MARGIN_PERMILLE)
                {
                    self.negative_since = None;
                    self.clear_since.get_or_insert(now_ms);
                }
                // In the hysteresis band: neither rises nor clears.
            }
            Message::Alert { .. } => {}
        }
    }

    fn link_alive(&self, now_ms: u32) -> bool {
        self.last_heartbeat
            .is_some_and(|t| now_ms.wrapping_sub(t) <= self.config.heartbeat_timeout_ms)
    }

    fn next_mode(&mut self, now_ms: u32) -> Mode {
        if !self.link_alive(now_ms) {
            self.negative_since = None;
            self.clear_since = None;
            return Mode::FailSafe;
        }
        let current = match self.mode {
            Mode::Active { level } => level,
            Mode::FailSafe => 0,
        };
        let hold = self.config.hold_ms.max(1);
        let level = if let Some(since) = self.negative_since {
            let steps = now_ms.wrapping_sub(since) / hold;
            current.max(steps.min(3) as u8)
        } else if let Some(since) = self.clear_since {
            if now_ms.wrapping_sub(since) >= 2 * hold {
                0
            } else {
                current
            }
        } else {
            current
        };
        Mode::Active { level }
    }

    /// Advance to `now_ms`: update the state and drive the outputs. Returns the alert message to
    /// report when the state changed.
    pub fn tick(
        &mut self,
        now_ms: u32,
    ) -> Result<Option<Message>, OutputError<L::Error, B::Error>> {
        let mode = self.next_mode(now_ms);
        let changed = mode != self.mode;
        self.mode = mode;
        let (led, percent) = match mode {
            Mode::FailSafe => (now_ms % 1000 < 100, 0),
            Mode::Active { level: 0 } => (false, 0),
            Mode::Active { level: 1 } => (true, 0),
            Mode::Active { level: 2 } => (true, if now_ms % 1000 < 200 { 30 } else { 0 }),
            Mode::Active { .. } => (true, 60),
        };
        if self.led_on != Some(led) {
            if led {
                self.led.set_high().map_err(OutputError::Led)?;
            } else {
                self.led.set_low().map_err(OutputError::Led)?;
            }
            self.led_on = Some(led);
        }
        let duty = (u32::from(self.max_duty) * percent / 100) as u16;
        if self.duty != Some(duty) {
            self.buzzer
                .set_duty_cycle(duty)
                .map_err(OutputError::Buzzer)?;
            self.duty = Some(duty);
        }
        Ok(changed.then_some(match mode {
            Mode::FailSafe => Message::Alert {
                kind: AlertKind::LinkLost,
                level: 1,
            },
            Mode::Active { level } => Message::Alert {
                kind: AlertKind::NegativeExpression,
                level,
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use embedded_hal_mock::eh1::digital::{Mock as Pin, State, Transaction as PinT};
    use embedded_hal_mock::eh1::pwm::{Mock as Pwm, Transaction as PwmT};
    use std::vec;

    const MAX: u16 = 1000;

    fn expr(class: u8, permille: u16) -> Message {
        Message::Expression {
            class,
            confidence_permille: permille,
            time_ms: 0,
        }
    }

    fn level(l: u8) -> Option<Message> {
        Some(Message::Alert {
            kind: AlertKind::NegativeExpression,
            level: l,
        })
    }

    const LOST: Option<Message> = Some(Message::Alert {
        kind: AlertKind::LinkLost,
        level: 1,
    });

    /// Each transition with the outputs it drives: fail-safe at start, connect, rise through
    /// levels 1-3 under a sustained negative expression (anger at 80 %), hold in the hysteresis
    /// band, clear after twice the hold time of neutral, fail-safe when heartbeats stop.
    #[test]
    fn transitions_drive_the_outputs() {
        let led = Pin::new(&[
            PinT::set(State::High), // t=0 fail-safe blink on
            PinT::set(State::Low),  // t=500 connected, idle
            PinT::set(State::High), // t=2600 level 1
            PinT::set(State::Low),  // t=13000 cleared
            PinT::set(State::High), // t=17000 fail-safe blink on
            PinT::set(State::Low),  // t=17150 blink off
        ]);
        let buzzer = Pwm::new(&[
            PwmT::max_duty_cycle(MAX),
            PwmT::set_duty_cycle(0),   // t=0
            PwmT::set_duty_cycle(300), // t=5000 level 2: the first 200 ms of each second
            PwmT::set_duty_cycle(0),   // t=5200
            PwmT::set_duty_cycle(300), // t=6000
            PwmT::set_duty_cycle(0),   // t=6200
            PwmT::set_duty_cycle(600), // t=6600 level 3
            PwmT::set_duty_cycle(0),   // t=13000 cleared
        ]);
        let mut c = AlertController::new(led, buzzer, Config::default());
        assert_eq!(c.tick(0), Ok(None));
        assert_eq!(c.mode(), Mode::FailSafe);
        c.on_message(&Message::Heartbeat { seq: 0 }, 500);
        assert_eq!(c.tick(500), Ok(level(0)));
        // Anger (class 3) at 80 % from t=600: level 1 after 2 s, 2 after 4 s, 3 after 6 s.
        let mut out = vec![];
        for t in (600..=6600).step_by(200) {
            if t % 1000 == 0 {
                c.on_message(&Message::Heartbeat { seq: t }, t);
            }
            c.on_message(&expr(3, 800), t);
            out.push((t, c.tick(t).unwrap()));
        }
        let changes: vec::Vec<_> = out.iter().filter(|(_, m)| m.is_some()).collect();
        assert_eq!(
            changes,
            [&(2600, level(1)), &(4600, level(2)), &(6600, level(3))]
        );
        // In the hysteresis band (anger at 55 %, threshold 60 %, margin 10 %): stays at 3.
        for t in (6800..=9000).step_by(200) {
            c.on_message(&Message::Heartbeat { seq: t }, t);
            c.on_message(&expr(3, 550), t);
            assert_eq!(c.tick(t), Ok(None), "t={t}");
        }
        // Neutral (class 2) from t=9000: clears after 2 · hold = 4 s.
        for t in (9000..13000).step_by(500) {
            c.on_message(&Message::Heartbeat { seq: t }, t);
            c.on_message(&expr(2, 900), t);
            assert_eq!(c.tick(t), Ok(None), "t={t}");
        }
        c.on_message(&Message::Heartbeat { seq: 13000 }, 13000);
        c.on_message(&expr(2, 900), 13000);
        assert_eq!(c.tick(13000), Ok(level(0)));
        // Heartbeats stop: fail-safe once the 3 s timeout has passed.
        assert_eq!(c.tick(16000), Ok(None));
        assert_eq!(c.tick(17000), Ok(LOST));
        assert_eq!(c.tick(17150), Ok(None));
        let (mut led, mut buzzer) = c.release();
        led.done();
        buzzer.done();
    }

    /// A configuration message changes which classes count and how long they must last.
    #[test]
    fn config_changes_classes_and_hold() {
        let led = Pin::new(&[PinT::set(State::Low), PinT::set(State::High)]);
        let buzzer = Pwm::new(&[PwmT::max_duty_cycle(MAX), PwmT::set_duty_cycle(0)]);
        let mut c = AlertController::new(led, buzzer, Config::default());
        c.on_message(
            &Message::Hello {
                protocol: 1,
                sender: crate::protocol::Sender::CameraLoop,
            },
            0,
        );
        c.on_message(
            &Message::Config(Config {
                negative_classes: 1 << 4, // surprise only
                hold_ms: 500,
                ..Config::default()
            }),
            0,
        );
        c.on_message(&expr(3, 990), 0); // anger no longer counts
        assert_eq!(c.tick(600), Ok(level(0)));
        c.on_message(&expr(4, 700), 700);
        assert_eq!(c.tick(1000), Ok(None));
        assert_eq!(c.tick(1200), Ok(level(1)));
        let (mut led, mut buzzer) = c.release();
        led.done();
        buzzer.done();
    }
}
