//! Data-parallel training: W workers (one per device, one thread each), each with a replica of
//! the model and of the optimiser, take contiguous shares of the global batch; the trainables'
//! gradients are summed across the workers (an all-reduce) so that every replica applies the
//! same AdamW update, the one a single worker computes on the whole batch.
//!
//! A worker's gradients are those of its share's mean loss weighted by `share / global`; their
//! sum over the workers is the gradient of the global batch's mean loss. One flat f32 buffer per
//! step travels through the reducer: every trainable's gradient in `named_vars` order, then the
//! clip-weighted loss sum, then one presence flag per trainable (a trainable no backward reached
//! gets no update, as with one worker).

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

use super::precision::LossScaler;
use super::step::{batch_gradients, GradientPlan, Optimizers};
use crate::error::{Error, Result};
use crate::peclip::PeClip;

/// Sums one flat f32 buffer across the workers of a data-parallel group.
pub trait Reducer: Send {
    /// This worker's index, `0..world`.
    fn rank(&self) -> usize;
    /// Workers in the group.
    fn world(&self) -> usize;
    /// The elementwise sum over the workers of `flat` (1-D f32, the same length on every
    /// worker), on `flat`'s device. Every worker gets the identical sum. An error on one worker
    /// (or one dropped before the group's last call) fails the call on the others.
    fn all_reduce_sum(&mut self, flat: &Tensor) -> Result<Tensor>;
    /// This worker failed and will not reduce again: the others' reductions fail instead of
    /// waiting for it.
    fn abort(&mut self);
}

/// Worker `rank`'s clips of a global batch of `global`: contiguous, sizes differing by at most
/// one (empty when `global < world`).
pub fn shard(global: usize, world: usize, rank: usize) -> Range<usize> {
    rank * global / world..(rank + 1) * global / world
}

/// One worker's part of a data-parallel step: the gradients of its share (`videos`, `labels`,
/// `mix`: the rows `shard(global, world, rank)` of the global batch; possibly none), summed
/// with the other workers' through `reducer`, unscaled by `scaler` (`plan.loss_scale` is its
/// scale), and the optimisers' step unless the scaler skips it. Returns the global batch's mean
/// loss (the same on every worker).
#[allow(clippy::too_many_arguments)]
pub fn parallel_step(
    model: &PeClip,
    opt: &mut Optimizers,
    reducer: &mut dyn Reducer,
    scaler: &mut LossScaler,
    videos: Option<&Tensor>,
    labels: &[u32],
    mix: Option<(&[u32], f64)>,
    plan: GradientPlan,
    global: usize,
) -> Result<f64> {
    let (mut grads, loss) = parallel_gradients(model, reducer, videos, labels, mix, plan, global)?;
    if scaler.unscale(model, &mut grads)? {
        opt.adapters.step(&grads)?;
        opt.prompts.step(&grads)?;
    }
    Ok(loss)
}

/// The gradients of the global batch's mean loss (times `plan.loss_scale`) and that loss, from
/// this worker's share and the others' through `reducer`: [`parallel_step`] without the
/// optimiser.
pub fn parallel_gradients(
    model: &PeClip,
    reducer: &mut dyn Reducer,
    videos: Option<&Tensor>,
    labels: &[u32],
    mix: Option<(&[u32], f64)>,
    plan: GradientPlan,
    global: usize,
) -> Result<(GradStore, f64)> {
    let vars: Vec<_> = model
        .trainables
        .named_vars()
        .map(|(_, v)| v.clone())
        .collect();
    let device = &model.clip.device;
    // The share's mean loss weighted by `share / global` before backward: the backward pass is
    // then the one a single worker runs on this micro-batch of the global batch.
    let local_plan = GradientPlan {
        loss_scale: plan.loss_scale * (labels.len() as f64 / global as f64),
        ..plan
    };
    let local = match videos {
        Some(v) if !labels.is_empty() => match batch_gradients(model, v, labels, mix, local_plan) {
            Ok(g) => Some(g),
            Err(e) => {
                reducer.abort();
                return Err(e);
            }
        },
        _ => None,
    };
    let mut parts = Vec::with_capacity(2 * vars.len() + 1);
    let mut flags = Vec::with_capacity(vars.len());
    for var in &vars {
        let g = local.as_ref().and_then(|(g, _)| g.get(var.as_tensor()));
        flags.push(if g.is_some() { 1f32 } else { 0.0 });
        parts.push(match g {
            Some(g) => g.flatten_all()?,
            None => Tensor::zeros(var.elem_count(), DType::F32, device)?,
        });
    }
    let loss_sum: f64 = local
        .as_ref()
        .map_or(0.0, |(_, l)| l.iter().map(|(x, n)| x * *n as f64).sum());
    parts.push(Tensor::new(&[loss_sum as f32], device)?);
    parts.push(Tensor::new(flags.as_slice(), device)?);
    let flat = Tensor::cat(&parts, 0)?;
    let sum = reducer.all_reduce_sum(&flat)?;
    if sum.dims1()? != flat.dims1()? {
        return Err(Error::Config(format!(
            "all-reduce returned {} values for {}",
            sum.dims1()?,
            flat.dims1()?
        )));
    }
    let total: usize = vars.iter().map(|v| v.elem_count()).sum();
    let tail = sum.narrow(0, total, vars.len() + 1)?.to_vec1::<f32>()?;
    let mut grads = Tensor::zeros((), DType::F32, device)?.backward()?;
    let mut at = 0;
    for (i, var) in vars.iter().enumerate() {
        let n = var.elem_count();
        if tail[1 + i] > 0.0 {
            grads.insert(var.as_tensor(), sum.narrow(0, at, n)?.reshape(var.dims())?);
        }
        at += n;
    }
    Ok((grads, f64::from(tail[0]) / global as f64))
}

/// An in-process reducer over threads (host memory): workers on any devices of one machine
/// (CPU or several GPUs of one process without NCCL). The sum is taken in rank order, so every
/// worker's result is bit-identical.
#[derive(Debug)]
pub struct ThreadReducer {
    rank: usize,
    group: Arc<Group>,
}

#[derive(Debug)]
struct Group {
    world: usize,
    state: Mutex<GroupState>,
    turned: Condvar,
}

#[derive(Debug, Default)]
struct GroupState {
    slots: Vec<Option<Vec<f32>>>,
    arrived: usize,
    /// Completed reductions.
    round: u64,
    result: Arc<Vec<f32>>,
    /// A worker failed or left: every waiting and later call fails.
    aborted: bool,
}

impl ThreadReducer {
    /// The `world` reducers of one group, rank order.
    pub fn group(world: usize) -> Vec<ThreadReducer> {
        let group = Arc::new(Group {
            world,
            state: Mutex::new(GroupState {
                slots: vec![None; world],
                ..GroupState::default()
            }),
            turned: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadReducer {
                rank,
                group: group.clone(),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        // A worker that panicked while holding the lock left the group in an unknown state.
        self.group.state.lock().unwrap_or_else(|p| {
            let mut s = p.into_inner();
            s.aborted = true;
            s
        })
    }
}

fn left_the_group() -> Error {
    Error::Config("a data-parallel worker failed; the others stop".into())
}

impl Reducer for ThreadReducer {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.group.world
    }
    fn all_reduce_sum(&mut self, flat: &Tensor) -> Result<Tensor> {
        let host = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let len = host.len();
        let mut s = self.lock();
        if s.aborted {
            return Err(left_the_group());
        }
        s.slots[self.rank] = Some(host);
        s.arrived += 1;
        if s.arrived == self.group.world {
            let mut slots = std::mem::replace(&mut s.slots, vec![None; self.group.world]);
            let mut acc = slots[0].take().expect("every worker arrived");
            for (r, other) in slots.iter_mut().enumerate().skip(1) {
                let other = other.take().expect("every worker arrived");
                if other.len() != acc.len() {
                    s.aborted = true;
                    self.group.turned.notify_all();
                    return Err(Error::Config(format!(
                        "all-reduce: worker {r} sent {} values, worker 0 {}",
                        other.len(),
                        acc.len()
                    )));
                }
                for (a, b) in acc.iter_mut().zip(&other) {
                    *a += b;
                }
            }
            s.result = Arc::new(acc);
            s.arrived = 0;
            s.round += 1;
            self.group.turned.notify_all();
        } else {
            let round = s.round;
            while s.round == round && !s.aborted {
                s = self
                    .group
                    .turned
                    .wait(s)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if s.round == round {
                return Err(left_the_group());
            }
        }
        let result = s.result.clone();
        drop(s);
        if result.len() != len {
            return Err(Error::Config(format!(
                "all-reduce: this worker sent {len} values, worker 0 {}",
                result.len()
            )));
        }
        Ok(Tensor::from_slice(&result, len, flat.device())?)
    }
    fn abort(&mut self) {
        let mut s = self.lock();
        s.aborted = true;
        self.group.turned.notify_all();
    }
}

impl Drop for ThreadReducer {
    /// A worker leaving (or unwinding from a panic) wakes the others: a reduction it will never
    /// join fails instead of waiting forever. After the last reduction nobody waits, so a normal
    /// end is harmless.
    fn drop(&mut self) {
        self.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peclip::model::tests::{activate_tda, tiny_model, videos};
    use crate::peclip::PeClipConfig;
    use crate::train::Recompute;

    fn trainables(m: &PeClip) -> Vec<f32> {
        m.trainables
            .named_vars()
            .flat_map(|(_, v)| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    }

    fn flat_grads(m: &PeClip, g: &GradStore) -> Vec<f32> {
        m.trainables
            .named_vars()
            .flat_map(|(n, v)| {
                let t = g
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("no grad {n}"));
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect()
    }

    /// W workers over threads, each with its own replica, give the single worker's update.
    /// Against one worker accumulating over the same split (micro-batches equal to the shares:
    /// W = 2 and 3 on 6 clips, and 7 with one worker holding no clip) the summed gradients
    /// agree within 1e-6 (measured: bit-identical) and the loss within 1e-6; against the whole batch at
    /// once (also W = 4: shares of 1 and 2 clips, one worker recomputing its blocks) within
    /// 1e-5 (measured: 1.4e-6), the f32 floor of any split of this fixture (see the accumulation test in `step`:
    /// the text encoder's gradients are small remainders of large terms). Plain and mixed.
    /// Two AdamW steps then leave every replica bit-identical. (The trainables after AdamW
    /// are not compared with one worker's: Adam divides by the gradient's magnitude, so a
    /// gradient that is zero up to rounding moves its parameter by up to the learning rate.)
    #[test]
    fn workers_over_threads_give_the_single_worker_update() {
        let seed = 31;
        let fresh = || {
            let m = tiny_model(PeClipConfig::default(), seed);
            activate_tda(&m, 32);
            m
        };
        let n = 6;
        let v = videos(n, 3, 9);
        let labels = [1u32, 0, 5, 2, 6, 3];
        static PARTNERS: [u32; 6] = [3, 6, 2, 5, 0, 1];
        let mixes = [None, Some((&PARTNERS[..], 0.6))];
        let single = fresh();
        let reference = |micro: usize| -> Vec<(Vec<f32>, f64)> {
            mixes
                .iter()
                .map(|mix| {
                    let plan = GradientPlan {
                        micro,
                        ..GradientPlan::whole(n)
                    };
                    let (g, l) = batch_gradients(&single, &v, &labels, *mix, plan).unwrap();
                    let mean = l.iter().map(|(x, k)| x * *k as f64).sum::<f64>() / n as f64;
                    (flat_grads(&single, &g), mean)
                })
                .collect()
        };
        let whole = reference(n);
        let largest = whole[0].0.iter().fold(0f32, |a, b| a.max(b.abs()));
        assert!(largest > 1e-3, "{largest}");
        let worst =
            |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));

        for world in [2usize, 3, 4, 7] {
            let same_split = (n % world == 0)
                .then(|| reference(n / world))
                .or_else(|| (world > n).then(|| reference(1)));
            let reducers = ThreadReducer::group(world);
            // Per worker: the reduced gradients and loss of each mix, the trainables after.
            type Outcome = (Vec<Vec<f32>>, Vec<f64>, Vec<f32>);
            let results: Vec<Outcome> = std::thread::scope(|s| {
                let handles: Vec<_> = reducers
                    .into_iter()
                    .map(|mut red| {
                        let (v, fresh, labels, mixes) = (&v, &fresh, &labels, &mixes);
                        s.spawn(move || {
                            let m = fresh();
                            let r = shard(n, world, red.rank());
                            let part =
                                (!r.is_empty()).then(|| v.narrow(0, r.start, r.len()).unwrap());
                            let plan = GradientPlan {
                                micro: r.len().max(1),
                                recompute: if world == 4 && red.rank() == 1 {
                                    Recompute::Blocks
                                } else {
                                    Recompute::None
                                },
                                loss_scale: 1.0,
                            };
                            let rr = r.clone();
                            let share = move |mix: Option<(&'static [u32], f64)>| {
                                mix.map(|(p, l)| (&p[rr.clone()], l))
                            };
                            let mut grads = Vec::new();
                            let mut losses = Vec::new();
                            for mix in mixes {
                                let (g, loss) = parallel_gradients(
                                    &m,
                                    &mut red,
                                    part.as_ref(),
                                    &labels[r.clone()],
                                    share(*mix),
                                    plan,
                                    n,
                                )
                                .unwrap();
                                grads.push(flat_grads(&m, &g));
                                losses.push(loss);
                            }
                            let mut opt = Optimizers::new(&m, 2e-3, 1e-3).unwrap();
                            for mix in mixes {
                                parallel_step(
                                    &m,
                                    &mut opt,
                                    &mut red,
                                    &mut LossScaler::none(),
                                    part.as_ref(),
                                    &labels[r.clone()],
                                    share(*mix),
                                    plan,
                                    n,
                                )
                                .unwrap();
                            }
                            (grads, losses, trainables(&m))
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (rank, (grads, losses, after)) in results.iter().enumerate() {
                for k in 0..2 {
                    let d = worst(&whole[k].0, &grads[k]);
                    assert!(
                        d <= 1e-5,
                        "world {world} rank {rank} mix {k}: {d} from the whole batch"
                    );
                    assert!(
                        (losses[k] - whole[k].1).abs() < 1e-5,
                        "world {world}: loss {} vs {}",
                        losses[k],
                        whole[k].1
                    );
                    if let Some(same) = &same_split {
                        let d = worst(&same[k].0, &grads[k]);
                        assert!(
                            d <= 1e-6,
                            "world {world} rank {rank} mix {k}: {d} from one worker"
                        );
                        assert!(
                            (losses[k] - same[k].1).abs() < 1e-6,
                            "world {world}: loss {} vs {}",
                            losses[k],
                            same[k].1
                        );
                    }
                }
                assert_eq!(
                    after, &results[0].2,
                    "world {world}: replica {rank} differs"
                );
            }
            assert_ne!(
                results[0].2,
                trainables(&fresh()),
                "the steps moved nothing"
            );
        }
    }

    /// A worker that fails (here: leaves before its reduction) fails the others' reduction
    /// instead of leaving them waiting.
    #[test]
    fn a_failed_worker_fails_the_others() {
        let mut group = ThreadReducer::group(3);
        let leaver = group.pop().unwrap();
        let t = Tensor::new(&[1f32, 2.0], &candle_core::Device::Cpu).unwrap();
        let errors: Vec<bool> = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .into_iter()
                .map(|mut r| {
                    let t = &t;
                    s.spawn(move || r.all_reduce_sum(t).is_err())
                })
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(50));
            drop(leaver);
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(errors, [true, true]);
    }

    #[test]
    fn shards_cover_the_batch_in_order() {
        for (global, world) in [(8, 1), (8, 3), (5, 2), (2, 4)] {
            let all: Vec<usize> = (0..world).flat_map(|r| shard(global, world, r)).collect();
            assert_eq!(all, (0..global).collect::<Vec<_>>());
            let sizes: Vec<usize> = (0..world).map(|r| shard(global, world, r).len()).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        }
    }
}
