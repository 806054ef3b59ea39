//! The block pipeline: a step model cut after block `cut` into two stages, each on its own
//! thread and holding its own blocks' recurrent states, so that the second stage's blocks of
//! frame t run beside the first stage's blocks of frame t + 1. A frame's feature is the one
//! the whole model gives (the same operators on the same values; tract may fuse differently at
//! the cut, so equal to rounding), one frame later.
//!
//! The cut is made on the ONNX graph: the first stage is every node the states of blocks
//! `0..cut` depend on (the patch embedding and those blocks); the second, every other node.
//! Whatever a second-stage node reads from the first (the residual stream, and anything else
//! that crosses) becomes an output of the first stage and an input of the second.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc;

use pe_clip_models::package::io::{state_input_block, state_output};
use tract_onnx::pb;
use tract_onnx::prelude::*;

use super::{dims_of, in_f16_form_for_this_cpu, in_int8_form, plain_f32, Int8Form};
use crate::error::{Error, Result};

/// The two stages of a step model cut after a block.
#[derive(Debug, Clone)]
pub struct StageSplit {
    /// Frame and the states of blocks `0..cut` in; those states and `cross` out.
    pub first: pb::ModelProto,
    /// `cross` and the states of blocks `cut..` in; the feature and those states out.
    pub second: pb::ModelProto,
    /// The tensors passed from the first stage to the second, in order.
    pub cross: Vec<String>,
}

fn onnx_elem(dt: DatumType) -> Option<i32> {
    Some(match dt {
        DatumType::F32 => 1,
        DatumType::U8 => 2,
        DatumType::I8 => 3,
        DatumType::I32 => 6,
        DatumType::I64 => 7,
        DatumType::F16 => 10,
        _ => return None,
    })
}

/// Element types and shapes of the tensors `names` of ONNX `bytes`, as tract infers them.
fn tensor_facts(bytes: &[u8], names: &[String], context: &str) -> Result<Vec<(i32, Vec<usize>)>> {
    let err = |e: TractError| Error::engine(context, e);
    let model = super::onnx_reader()
        .model_for_read(&mut &bytes[..])
        .map_err(err)?
        .with_outputs_by_name(names)
        .map_err(err)?
        .into_typed()
        .map_err(err)?;
    (0..names.len())
        .map(|i| {
            let f = model.output_fact(i).map_err(err)?;
            let dims = f.shape.as_concrete().map(<[usize]>::to_vec);
            match (onnx_elem(f.datum_type.unquantized()), dims) {
                (Some(e), Some(d)) => Ok((e, d)),
                _ => Err(Error::engine(
                    context,
                    format!(
                        "{}: a tensor crossing the cut must have a fixed shape and a plain type, \
                         is {f:?}",
                        names[i]
                    ),
                )),
            }
        })
        .collect()
}

/// The blocks of a step model: its `state_in.<block>` inputs.
pub fn blocks_of(m: &pb::ModelProto) -> usize {
    m.graph.as_ref().map_or(0, |g| {
        g.input
            .iter()
            .filter(|i| state_input_block(&i.name).is_some())
            .count()
    })
}

/// Cut the step model in `bytes` after block `cut` (`1 <= cut < blocks`).
pub fn split_after_block(bytes: &[u8], cut: usize, context: &str) -> Result<StageSplit> {
    let m = crate::onnx::decode(bytes, context)?;
    let fail = |why: String| Error::engine(context, format!("block pipeline: {why}"));
    let g = m.graph.as_ref().ok_or_else(|| fail("no graph".into()))?;
    let blocks = blocks_of(&m);
    if cut == 0 || cut >= blocks {
        return Err(fail(format!(
            "cut after block {cut}: must be 1 to {} for {blocks} blocks",
            blocks.saturating_sub(1)
        )));
    }
    let outputs: HashSet<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    let first_states: Vec<String> = (0..cut).map(state_output).collect();
    for s in &first_states {
        if !outputs.contains(s.as_str()) {
            return Err(fail(format!("no output {s}")));
        }
    }
    let producer: HashMap<&str, usize> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    // The first stage: every node the first blocks' states depend on.
    let mut first = vec![false; g.node.len()];
    let mut todo: Vec<usize> = first_states
        .iter()
        .filter_map(|s| producer.get(s.as_str()).copied())
        .collect();
    while let Some(i) = todo.pop() {
        if std::mem::replace(&mut first[i], true) {
            continue;
        }
        todo.extend(
            g.node[i]
                .input
                .iter()
                .filter_map(|x| producer.get(x.as_str()).copied()),
        );
    }
    let graph_inputs: HashMap<&str, &pb::ValueInfoProto> =
        g.input.iter().map(|i| (i.name.as_str(), i)).collect();
    let later_state = |name: &str| state_input_block(name).is_some_and(|b| b >= cut);
    let mut cross: Vec<String> = Vec::new();
    for (i, n) in g.node.iter().enumerate() {
        for x in n.input.iter().filter(|x| !x.is_empty()) {
            let reads_input = graph_inputs.contains_key(x.as_str());
            if first[i] && reads_input && later_state(x) {
                return Err(fail(format!("{} of the first stage reads {x}", n.name)));
            }
            if !first[i] && reads_input && !later_state(x) {
                return Err(fail(format!("{} of the second stage reads {x}", n.name)));
            }
            let from_first = producer.get(x.as_str()).is_some_and(|&p| first[p]);
            if !first[i] && from_first && !cross.contains(x) {
                cross.push(x.clone());
            }
        }
    }
    for o in &g.output {
        let from_first = producer.get(o.name.as_str()).is_some_and(|&p| first[p]);
        if from_first != first_states.contains(&o.name) {
            return Err(fail(format!(
                "output {} is not a state of its stage's blocks",
                o.name
            )));
        }
    }
    let facts = tensor_facts(bytes, &cross, context)?;
    let cross_info: Vec<pb::ValueInfoProto> = cross
        .iter()
        .zip(&facts)
        .map(|(n, (e, d))| crate::onnx::typed_value_info(n, *e, Some(d)))
        .collect();
    let stage =
        |in_first: bool, inputs: Vec<pb::ValueInfoProto>, outputs: Vec<pb::ValueInfoProto>| {
            let node: Vec<pb::NodeProto> = g
                .node
                .iter()
                .zip(&first)
                .filter(|&(_, &f)| f == in_first)
                .map(|(n, _)| n.clone())
                .collect();
            let read: HashSet<&str> = node
                .iter()
                .flat_map(|n| n.input.iter().map(String::as_str))
                .collect();
            let initializer = g
                .initializer
                .iter()
                .filter(|t| read.contains(t.name.as_str()))
                .cloned()
                .collect();
            let mut out = m.clone();
            out.graph = Some(pb::GraphProto {
                name: format!("{}.{}", g.name, if in_first { "first" } else { "second" }),
                node,
                initializer,
                input: inputs,
                output: outputs,
                ..Default::default()
            });
            out
        };
    let first_inputs = g
        .input
        .iter()
        .filter(|i| !later_state(&i.name))
        .cloned()
        .collect();
    let mut first_outputs: Vec<pb::ValueInfoProto> = first_states
        .iter()
        .filter_map(|s| g.output.iter().find(|o| &o.name == s).cloned())
        .collect();
    first_outputs.extend(cross_info.iter().cloned());
    let mut second_inputs = cross_info;
    second_inputs.extend(g.input.iter().filter(|i| later_state(&i.name)).cloned());
    let second_outputs = g
        .output
        .iter()
        .filter(|o| !first_states.contains(&o.name))
        .cloned()
        .collect();
    Ok(StageSplit {
        first: stage(true, first_inputs, first_outputs),
        second: stage(false, second_inputs, second_outputs),
        cross,
    })
}

/// One stage in tract: its plan, and zeros of the recurrent states it carries.
struct Stage {
    runner: TypedSimpleState,
    zero_states: Vec<Tensor>,
    /// The shape of the first input (the frame, for the first stage).
    input_dims: Vec<usize>,
}

fn load_stage(m: &pb::ModelProto, states_from: usize, context: &str) -> Result<Stage> {
    use prost::Message;
    let err = |e: TractError| Error::engine(context, e);
    let bytes = m.encode_to_vec();
    let model = super::onnx_reader()
        .model_for_read(&mut &bytes[..])
        .map_err(err)?;
    let inputs = model.input_outlets().map_err(err)?.len();
    let input_dims = dims_of(&model.input_fact(0).map_err(err)?.clone())
        .ok_or_else(|| Error::engine(context, "a stage input has no fixed shape"))?;
    let zero_states = (states_from..inputs)
        .map(|k| {
            let dims = dims_of(&model.input_fact(k).map_err(err)?.clone())
                .ok_or_else(|| Error::engine(context, "a state has no fixed shape"))?;
            Tensor::zero::<f32>(&dims).map_err(err)
        })
        .collect::<Result<_>>()?;
    let plan = model
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(err)?;
    Ok(Stage {
        runner: plan.spawn().map_err(err)?,
        zero_states,
        input_dims,
    })
}

/// A frame for the first stage; `reset` starts a new clip (zero states) with it.
struct Job {
    frame: Vec<u8>,
    reset: bool,
}

/// What crosses from the first stage to the second for one frame.
type Handoff = Result<(Vec<Tensor>, bool)>;

/// A step model run as two stages on two threads (module doc). Frames go in with
/// [`BlockPipeline::submit`], features come out in the same order from
/// [`BlockPipeline::next_feature`]; at most two frames wait between the stages.
pub struct BlockPipeline {
    jobs: Option<mpsc::SyncSender<Job>>,
    features: mpsc::Receiver<Result<Vec<f32>>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    image_size: usize,
    cut: usize,
}

impl BlockPipeline {
    /// The step model in `bytes` (`context` names it in errors) cut after block `cut`
    /// (default: half its blocks), int8 and f16 products in the form this CPU runs (as
    /// [`super::StepModel::from_onnx`]); each stage single-threaded.
    pub fn new(bytes: &[u8], context: &str, cut: Option<usize>) -> Result<Self> {
        let bytes = in_int8_form(bytes, Int8Form::for_this_cpu(), context);
        let bytes = in_f16_form_for_this_cpu(bytes, context)?;
        let blocks = blocks_of(&crate::onnx::decode(&bytes, context)?);
        let cut = cut.unwrap_or(blocks / 2);
        let split = split_after_block(&bytes, cut, context)?;
        let cross = split.cross.len();
        let mut first = load_stage(&split.first, 1, context)?;
        let image_size = match first.input_dims.as_slice() {
            [1, h, w, 3] if h == w => *h,
            other => {
                return Err(Error::engine(
                    context,
                    format!("frame input must be [1, S, S, 3], found {other:?}"),
                ))
            }
        };
        let mut second = load_stage(&split.second, cross, context)?;
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(1);
        let (hand_tx, hand_rx) = mpsc::sync_channel::<Handoff>(1);
        let (feat_tx, features) = mpsc::channel::<Result<Vec<f32>>>();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|source| Error::Thread {
                    name: "block pipeline",
                    source,
                })
        };
        let first_stage = move || {
            let mut states = first.zero_states.clone();
            let s = image_size;
            for job in job_rx {
                if job.reset {
                    states = first.zero_states.clone();
                }
                let out = (|| -> Result<Vec<Tensor>> {
                    let err = |e: TractError| Error::engine("first stage", e);
                    if job.frame.len() != s * s * 3 {
                        return Err(Error::FrameSize {
                            side: s,
                            expected: s * s * 3,
                            got: job.frame.len(),
                        });
                    }
                    let frame = Tensor::from_shape(&[1, s, s, 3], &job.frame).map_err(err)?;
                    let mut inputs: TVec<TValue> = tvec![frame.into()];
                    inputs.extend(states.drain(..).map(TValue::from));
                    let mut out: Vec<Tensor> = first
                        .runner
                        .run(inputs)
                        .map_err(err)?
                        .into_iter()
                        .map(|v| v.into_tensor())
                        .collect();
                    let cross = out.split_off(out.len() - cross);
                    states = out;
                    Ok(cross)
                })();
                let failed = out.is_err();
                if hand_tx.send(out.map(|c| (c, job.reset))).is_err() || failed {
                    break;
                }
            }
        };
        let second_stage = move || {
            let mut states = second.zero_states.clone();
            for handoff in hand_rx {
                let out = handoff.and_then(|(cross, reset)| {
                    let err = |e: TractError| Error::engine("second stage", e);
                    if reset {
                        states = second.zero_states.clone();
                    }
                    let mut inputs: TVec<TValue> = cross.into_iter().map(TValue::from).collect();
                    inputs.extend(states.drain(..).map(TValue::from));
                    let mut out = second.runner.run(inputs).map_err(err)?.into_iter();
                    let feature = out
                        .next()
                        .ok_or_else(|| Error::engine("second stage", "no feature output"))?;
                    let feature = plain_f32(&feature).map_err(err)?.to_vec();
                    states = out.map(|v| v.into_tensor()).collect();
                    Ok(feature)
                });
                let failed = out.is_err();
                if feat_tx.send(out).is_err() || failed {
                    break;
                }
            }
        };
        let workers = vec![
            spawn("pipeline-first", Box::new(first_stage))?,
            spawn("pipeline-second", Box::new(second_stage))?,
        ];
        Ok(Self {
            jobs: Some(jobs),
            features,
            workers,
            image_size,
            cut,
        })
    }

    /// The block the model is cut after.
    pub fn cut(&self) -> usize {
        self.cut
    }

    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// Queue a frame (model-ready RGB bytes); `reset` starts a clip with zero states. Blocks
    /// while the first stage is busy and one frame already waits.
    pub fn submit(&self, frame: Vec<u8>, reset: bool) -> Result<()> {
        self.jobs
            .as_ref()
            .and_then(|j| j.send(Job { frame, reset }).ok())
            .ok_or(Error::Stopped("the block pipeline stopped"))
    }

    /// The feature of the oldest submitted frame whose feature was not taken yet (waits for it).
    pub fn next_feature(&self) -> Result<Vec<f32>> {
        self.features
            .recv()
            .map_err(|_| Error::Stopped("the block pipeline stopped"))?
    }
}

impl Drop for BlockPipeline {
    fn drop(&mut self) {
        self.jobs = None;
        // Drain, so a stage blocked on a full channel can end.
        while self.features.recv().is_ok() {}
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames of a clip, then the first frames again after a reset: the pipeline's features
    /// are the whole model's, at every cut.
    #[test]
    fn the_pipelined_stages_give_the_whole_models_features() {
        let pkg = crate::package::Package::embedded_demo().unwrap();
        let bytes = pkg.model_bytes().unwrap();
        let mut whole = pkg.step_model().unwrap();
        let s = whole.image_size();
        let frames: Vec<Vec<u8>> = (0..5)
            .map(|t| {
                (0..s * s * 3)
                    .map(|i| ((i * 31 + t * 57) % 253) as u8)
                    .collect()
            })
            .collect();
        // The reference: frames 0..4 as one clip, then frames 0..1 as a new clip.
        let order: Vec<(usize, bool)> = vec![
            (0, true),
            (1, false),
            (2, false),
            (3, false),
            (4, false),
            (0, true),
            (1, false),
        ];
        let mut state = whole.zero_state();
        let reference: Vec<Vec<f32>> = order
            .iter()
            .map(|&(k, reset)| {
                if reset {
                    state = whole.zero_state();
                }
                whole.step(&frames[k], &mut state).unwrap()
            })
            .collect();
        let blocks = blocks_of(&crate::onnx::decode(&bytes, "demo").unwrap());
        assert!(blocks >= 2);
        for cut in [1, blocks / 2, blocks - 1] {
            let p = BlockPipeline::new(&bytes, "demo", Some(cut)).unwrap();
            assert_eq!((p.cut(), p.image_size()), (cut, s));
            let mut got = Vec::new();
            for (i, &(k, reset)) in order.iter().enumerate() {
                p.submit(frames[k].clone(), reset).unwrap();
                if i >= 1 {
                    got.push(p.next_feature().unwrap());
                }
            }
            got.push(p.next_feature().unwrap());
            for (t, (g, r)) in got.iter().zip(&reference).enumerate() {
                let diff = g
                    .iter()
                    .zip(r)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(diff <= 1e-4, "cut {cut}, frame {t}: max diff {diff}");
            }
        }
        // A frame of the wrong size is an error in order, and the pipeline stops.
        let p = BlockPipeline::new(&bytes, "demo", None).unwrap();
        p.submit(frames[0].clone(), true).unwrap();
        p.submit(vec![0; 3], false).unwrap();
        assert!(p.next_feature().is_ok());
        assert!(matches!(p.next_feature(), Err(Error::FrameSize { .. })));
        assert!(BlockPipeline::new(&bytes, "demo", Some(blocks)).is_err());
        assert!(BlockPipeline::new(&bytes, "demo", Some(0)).is_err());
    }
}
