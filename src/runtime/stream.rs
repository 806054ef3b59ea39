//! Streaming over sampled frames with exact windows.
//!
//! Window `W` (sampled frames) and hop `H`: window `j` covers sampled frames `[jH, jH + W)`.
//! `n = ceil(W / H)` staggered chains share the work: chain `k` runs windows `j ≡ k (mod n)`,
//! starting each from zero state, so every prediction equals the offline model's prediction on
//! exactly those `W` frames (`logit_scale · normalize(mean_t feature_t) · text_features`). A
//! sampled frame costs one model step per chain whose window covers it (about `W / H`).
//!
//! Before the first window completes, chain 0's running mean gives partial predictions (marked).
//! `Continuous` mode instead runs one chain that is never reset and predicts from the mean of the
//! last `W` features: one step per sampled frame, but the GRU state carries history from before
//! the window, so it only approximates the offline model.

use std::collections::VecDeque;

use crate::engine::{BlockPipeline, StepModel, StepState};
use crate::error::{Error, Result};
use crate::package::Head;

/// Window geometry and mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windowing {
    /// Sampled frames per prediction.
    pub window: usize,
    /// Sampled frames between predictions.
    pub hop: usize,
    /// One never-reset chain, mean over the last `window` features.
    pub continuous: bool,
    /// Before the first full window, a partial prediction every this many sampled frames
    /// (0: none).
    pub partial_every: usize,
}

impl Windowing {
    /// Check the geometry.
    pub fn validate(&self) -> Result<()> {
        if self.window == 0 || self.hop == 0 {
            return Err(Error::usage(format!(
                "window {} and hop {} must be at least 1",
                self.window, self.hop
            )));
        }
        Ok(())
    }

    /// Chains the exact mode keeps (`ceil(W / H)`; 1 in continuous mode).
    pub fn chains(&self) -> usize {
        if self.continuous {
            1
        } else {
            self.window.div_ceil(self.hop)
        }
    }
}

/// One window's (or partial window's) answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Sampled-frame index of the window's last frame (0-based).
    pub sample: u64,
    /// Source frame index of the window's first and last frame.
    pub first_frame: u64,
    pub frame: u64,
    /// Timestamp of the last frame (ms).
    pub t_ms: f64,
    /// Sampled frames averaged (`window` unless partial).
    pub frames: usize,
    pub partial: bool,
    pub logits: Vec<f32>,
    pub probs: Vec<f32>,
}

struct Chain {
    state: StepState,
    sum: Vec<f64>,
    count: usize,
}

/// The streaming state: chains, the recent sampled frames' indices and (continuous mode) the
/// last `window` features. An explicit value, owned by the caller.
pub struct Streamer {
    geometry: Windowing,
    head: Head,
    /// A driver profile's correction of the head, if any.
    correction: Option<pe_clip_calibrate::profile::Correction>,
    chains: Vec<Chain>,
    /// (source frame index, t_ms) of the last `window` sampled frames.
    recent: VecDeque<(u64, f64)>,
    /// Continuous mode: the last `window` features and their sum.
    features: VecDeque<Vec<f32>>,
    feature_sum: Vec<f64>,
    sampled: u64,
    /// Model steps run (all chains).
    pub steps: u64,
    /// Forks of the model ([`StepModel::fork`]) stepping chains on their own threads beside
    /// the caller's model ([`Streamer::with_chain_threads`]).
    helpers: Vec<StepModel>,
    /// The model as a two-stage pipeline ([`Streamer::with_block_pipeline`]), with the frames
    /// submitted to it whose features are still to come: (source index, t_ms).
    pipeline: Option<BlockPipeline>,
    in_flight: VecDeque<(u64, f64)>,
    submitted: u64,
}

/// Where the feature of the frame being accounted for comes from.
enum FeatureSource<'a> {
    /// Step the chains on this frame.
    Step(&'a mut StepModel, &'a [u8]),
    /// The block pipeline computed it (one chain).
    Given(Vec<f32>),
}

impl Streamer {
    /// A streamer for `model` under `geometry`.
    pub fn new(model: &StepModel, head: Head, geometry: Windowing) -> Result<Self> {
        geometry.validate()?;
        let dim = head.feature_dim;
        let chains = (0..geometry.chains())
            .map(|_| Chain {
                state: model.zero_state(),
                sum: vec![0.0; dim],
                count: 0,
            })
            .collect();
        Ok(Self {
            geometry,
            head,
            correction: None,
            chains,
            recent: VecDeque::with_capacity(geometry.window + 1),
            features: VecDeque::with_capacity(geometry.window + 1),
            feature_sum: vec![0.0; dim],
            sampled: 0,
            steps: 0,
            helpers: Vec::new(),
            pipeline: None,
            in_flight: VecDeque::with_capacity(2),
            submitted: 0,
        })
    }

    /// Step the model as `pipeline`'s two stages on two threads (same features, to rounding).
    /// Only for one chain: continuous mode, or exact windows with hop = window.
    pub fn with_block_pipeline(mut self, pipeline: BlockPipeline) -> Result<Self> {
        let g = self.geometry;
        if !(g.continuous || g.hop == g.window) {
            return Err(Error::usage(format!(
                "the block pipeline steps one chain: give --hop {} (= the window) or \
                 --continuous (hop {} makes {} chains; --chain-threads steps those side by side)",
                g.window,
                g.hop,
                g.chains()
            )));
        }
        self.pipeline = Some(pipeline);
        Ok(self)
    }

    /// Whether frames go through the block pipeline ([`Streamer::submit`]).
    pub fn pipelined(&self) -> bool {
        self.pipeline.is_some()
    }

    /// Frames submitted to the block pipeline whose predictions are not accounted for yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Hand a sampled frame to the block pipeline (blocks while both stages are busy and one
    /// frame waits); [`Streamer::complete`] accounts for it later, in order.
    pub fn submit(&mut self, frame_bytes: Vec<u8>, frame_index: u64, t_ms: f64) -> Result<()> {
        let Some(p) = &self.pipeline else {
            return Err(Error::usage("submit needs the block pipeline"));
        };
        let g = self.geometry;
        let reset = self.submitted == 0
            || (!g.continuous && self.submitted.is_multiple_of(g.window as u64));
        p.submit(frame_bytes, reset)?;
        self.submitted += 1;
        self.in_flight.push_back((frame_index, t_ms));
        Ok(())
    }

    /// Wait for the oldest submitted frame's feature and account for it as [`Streamer::push`]
    /// does; `None` when nothing is in flight or the frame completes no prediction.
    pub fn complete(&mut self) -> Result<Option<Prediction>> {
        let (Some(p), Some(&(frame_index, t_ms))) = (&self.pipeline, self.in_flight.front()) else {
            return Ok(None);
        };
        let feature = p.next_feature()?;
        self.in_flight.pop_front();
        self.advance(FeatureSource::Given(feature), frame_index, t_ms)
    }

    /// Step the chains a frame advances on up to `threads` threads (each with its fork of
    /// `model`). The chains are independent, so the features, and every prediction, are the
    /// same as on one thread; only exact windows with H < W have more than one chain.
    pub fn with_chain_threads(mut self, model: &StepModel, threads: usize) -> Result<Self> {
        let n = threads.clamp(1, self.chains.len()) - 1;
        self.helpers = (0..n).map(|_| model.fork()).collect::<Result<_>>()?;
        Ok(self)
    }

    /// Score windows with a driver profile's correction of the head.
    pub fn with_correction(mut self, correction: pe_clip_calibrate::profile::Correction) -> Self {
        self.correction = Some(correction);
        self
    }

    /// Sampled frames seen so far.
    pub fn sampled(&self) -> u64 {
        self.sampled
    }

    fn prediction(&self, sum: &[f64], frames: usize, partial: bool) -> Prediction {
        let logits = match &self.correction {
            Some(c) => c.logits(&self.head.text_features, self.head.logit_scale, sum, frames),
            None => self.head.logits_of_sum(sum),
        };
        let probs = pe_clip_models::prediction::softmax(&logits);
        let (first_frame, _) = self.recent[self.recent.len() - frames.min(self.recent.len())];
        let &(frame, t_ms) = self.recent.back().expect("a frame was pushed");
        Prediction {
            sample: self.sampled - 1,
            first_frame,
            frame,
            t_ms,
            frames,
            partial,
            logits,
            probs,
        }
    }

    /// Feed one sampled frame (model-ready bytes) with its source index and time; returns the
    /// predictions it completes (at most one full window, or one partial).
    /// With the block pipeline, the frame is submitted and waited for.
    pub fn push(
        &mut self,
        model: &mut StepModel,
        frame_bytes: &[u8],
        frame_index: u64,
        t_ms: f64,
    ) -> Result<Option<Prediction>> {
        if self.pipeline.is_some() {
            self.submit(frame_bytes.to_vec(), frame_index, t_ms)?;
            let mut last = None;
            while self.in_flight() > 0 {
                last = self.complete()?.or(last);
            }
            return Ok(last);
        }
        self.advance(FeatureSource::Step(model, frame_bytes), frame_index, t_ms)
    }

    /// Account for one sampled frame, its feature from `source`.
    fn advance(
        &mut self,
        source: FeatureSource,
        frame_index: u64,
        t_ms: f64,
    ) -> Result<Option<Prediction>> {
        let g = self.geometry;
        let i = self.sampled as usize;
        self.sampled += 1;
        self.recent.push_back((frame_index, t_ms));
        if self.recent.len() > g.window {
            self.recent.pop_front();
        }
        let partial_due = g.partial_every > 0 && (i + 1).is_multiple_of(g.partial_every);
        if g.continuous {
            let chain = &mut self.chains[0];
            let f = match source {
                FeatureSource::Step(model, frame) => model.step(frame, &mut chain.state)?,
                FeatureSource::Given(f) => f,
            };
            self.steps += 1;
            for (s, v) in self.feature_sum.iter_mut().zip(&f) {
                *s += *v as f64;
            }
            self.features.push_back(f);
            if self.features.len() > g.window {
                let old = self.features.pop_front().expect("non-empty");
                for (s, v) in self.feature_sum.iter_mut().zip(&old) {
                    *s -= *v as f64;
                }
            }
            let n = self.features.len();
            return Ok(
                if n == g.window && (i + 1 - g.window).is_multiple_of(g.hop) {
                    Some(self.prediction(&self.feature_sum, n, false))
                } else if n < g.window && partial_due {
                    Some(self.prediction(&self.feature_sum, n, true))
                } else {
                    None
                },
            );
        }
        let period = self.chains.len() * g.hop;
        let mut active: Vec<(usize, &mut Chain)> = Vec::with_capacity(self.chains.len());
        for (k, chain) in self.chains.iter_mut().enumerate() {
            let start = k * g.hop;
            if i < start {
                continue;
            }
            let r = (i - start) % period;
            if r >= g.window {
                continue;
            }
            if r == 0 {
                if let FeatureSource::Step(model, _) = &source {
                    chain.state = model.zero_state();
                }
                chain.sum.iter_mut().for_each(|s| *s = 0.0);
                chain.count = 0;
            }
            active.push((k, chain));
        }
        self.steps += active.len() as u64;
        let done = match source {
            FeatureSource::Step(model, frame) => {
                step_chains(model, &mut self.helpers, active, frame, g.window)?
            }
            // One chain (checked in `with_block_pipeline`), its state in the pipeline's stages.
            FeatureSource::Given(f) => {
                let mut done = None;
                for (k, chain) in active {
                    for (s, v) in chain.sum.iter_mut().zip(&f) {
                        *s += *v as f64;
                    }
                    chain.count += 1;
                    if chain.count == g.window {
                        done = Some(k);
                    }
                }
                done
            }
        };
        Ok(if let Some(k) = done {
            Some(self.prediction(&self.chains[k].sum, g.window, false))
        } else if i + 1 < g.window && partial_due {
            Some(self.prediction(&self.chains[0].sum, i + 1, true))
        } else {
            None
        })
    }
}

/// Step every chain in `active` on `frame`, spread over `model` and `helpers` (one thread
/// each, round robin); returns the chain whose window this frame completes.
fn step_chains(
    model: &mut StepModel,
    helpers: &mut [StepModel],
    active: Vec<(usize, &mut Chain)>,
    frame: &[u8],
    window: usize,
) -> Result<Option<usize>> {
    let advance = |m: &mut StepModel, chains: Vec<(usize, &mut Chain)>| -> Result<Option<usize>> {
        let mut done = None;
        for (k, chain) in chains {
            let f = m.step(frame, &mut chain.state)?;
            for (s, v) in chain.sum.iter_mut().zip(&f) {
                *s += *v as f64;
            }
            chain.count += 1;
            if chain.count == window {
                done = Some(k);
            }
        }
        Ok(done)
    };
    if helpers.is_empty() || active.len() < 2 {
        return advance(model, active);
    }
    let workers = (1 + helpers.len()).min(active.len());
    let mut groups: Vec<Vec<(usize, &mut Chain)>> = (0..workers).map(|_| Vec::new()).collect();
    for (j, c) in active.into_iter().enumerate() {
        groups[j % workers].push(c);
    }
    let mut groups = groups.into_iter();
    let mine = groups.next().unwrap_or_default();
    std::thread::scope(|scope| {
        let handles: Vec<_> = helpers
            .iter_mut()
            .zip(groups)
            .map(|(h, g)| scope.spawn(move || advance(h, g)))
            .collect();
        let mut done = advance(model, mine)?;
        for h in handles {
            let d = h
                .join()
                .map_err(|_| Error::Stopped("a chain thread panicked"))??;
            done = done.or(d);
        }
        Ok(done)
    })
}
