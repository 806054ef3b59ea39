//! The alert controller on an STM32F411 "Black Pill" board (25 MHz crystal).
//!
//! Wiring (3.3 V logic, common ground with the camera computer):
//! - PA10 (USART1 RX) <- the camera computer's UART TX (e.g. Jetson header pin 8); PA9 (TX) ->
//!   its RX (pin 10) for the controller's alert reports. 115200 baud, 8N1.
//! - PB12 -> LED through a 330 ohm resistor to ground (on = high).
//! - PA0 (TIM2 channel 1, 2.7 kHz PWM) -> an NPN transistor or MOSFET driving a buzzer or a
//!   haptic motor (with a flyback diode for a motor).
//!
//! The loop reads the UART byte by byte into the protocol decoder, hands messages to the
//! controller, and ticks it with a millisecond clock (TIM5, 32 bit); state changes are sent
//! back as `Alert` frames.
#![no_std]
#![no_main]
#![deny(unsafe_code)]

use cortex_m_rt::entry;
use panic_halt as _;
use pe_clip_firmware::controller::AlertController;
use pe_clip_firmware::protocol::{self, Config, Decoder, MAX_FRAME};
use stm32f4xx_hal::{pac, prelude::*};

#[entry]
fn main() -> ! {
    let dp = pac::Peripherals::take().expect("peripherals are taken once, here");
    let rcc = dp.RCC.constrain();
    let clocks = rcc.cfgr.use_hse(25.MHz()).sysclk(48.MHz()).freeze();
    let gpioa = dp.GPIOA.split();
    let gpiob = dp.GPIOB.split();

    let led = gpiob.pb12.into_push_pull_output();
    let (_, (ch1, ..)) = dp.TIM2.pwm_hz(2700.Hz(), &clocks);
    let mut buzzer = ch1.with(gpioa.pa0);
    buzzer.enable();

    let serial = dp
        .USART1
        .serial((gpioa.pa9, gpioa.pa10), 115_200.bps(), &clocks)
        .expect("115200 baud is reachable from 48 MHz");
    let (mut tx, mut rx) = serial.split();

    let mut clock = dp.TIM5.counter_ms(&clocks);
    clock
        .start(u32::MAX.millis())
        .expect("TIM5 counts 32 bits of milliseconds");

    let mut controller = AlertController::new(led, buzzer, Config::default());
    let mut decoder = Decoder::new();
    loop {
        let now = clock.now().ticks();
        while let Ok(byte) = rx.read() {
            if let Some(Ok(msg)) = decoder.push(byte) {
                controller.on_message(&msg, now);
            }
        }
        if let Ok(Some(report)) = controller.tick(now) {
            let mut buf = [0u8; MAX_FRAME + 1];
            if let Ok(n) = protocol::encode_delimited(&report, &mut buf) {
                for b in &buf[..n] {
                    let _ = nb::block!(tx.write(*b));
                }
            }
        }
    }
}
