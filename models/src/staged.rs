//! What the data-parallel engine trains: any model whose training forward splits into stages, each owning its own
//! parameters, that read the values earlier stages made (a U-Net's skip connections, RadiT's conditioning
//! vector). The engine runs the stages one after another, keeps each stage's autograd graph, and backpropagates
//! them in reverse, one at a time, so a stage's gradients can travel while the stages before it run backward.
//! A model knows nothing about ranks; the engine knows nothing about the model's names beyond what it says here.

use tch::{Kind, Tensor};

use crate::block::{BlockModel, ModelInputs};
use crate::error::ModelError;
use crate::precision::Precision;

/// One micro-batch as the stages see it: the inputs and, in training, the per-sample dropout keys.
#[derive(Clone, Copy)]
pub struct StageInputs<'a> {
    pub inputs: ModelInputs<'a>,
    /// One key per sample (see `unet::dropout::keys`); `None` turns dropout off.
    pub keys: Option<&'a Tensor>,
}

/// A model the data-parallel engine can train stage by stage.
pub trait StagedModel: Send {
    /// The checkpoint groups' names, in order: `rest` first, as the sharded engine names its groups, so a
    /// checkpoint's layout reads the same whichever engine wrote it.
    fn groups(&self) -> Vec<String>;
    /// The group a parameter is saved in.
    fn group_of(&self, name: &str) -> usize;
    fn stages(&self) -> usize;
    /// The one stage that uses a trainable parameter.
    fn stage_of(&self, name: &str) -> usize;
    /// Shapes, kinds and ranges of one micro-batch, checked before anything runs.
    fn check_inputs(&self, inputs: &ModelInputs) -> Result<(), ModelError>;
    /// Stage `i` from the values the earlier stages made (in the order they made them); returns the values it
    /// makes. The last stage returns the output (fp32) first, then whatever else the objective reads (an
    /// autoencoder's latent mean and log-variance).
    fn stage(
        &self,
        i: usize,
        values: &[Tensor],
        at: &StageInputs,
    ) -> Result<Vec<Tensor>, ModelError>;
    /// Whether a parameter is kept at unit RMS per row (dim 0) by forced weight normalisation after every
    /// optimiser step (EDM2's MPConv weights).
    fn normalized_rows(&self, _name: &str) -> bool {
        false
    }
    fn set_precision(&mut self, precision: Precision);
}

/// Runs every stage in order: the model's whole forward, for evaluation and for tests. Returns the last stage's
/// values, the output first.
pub fn run_stages(model: &dyn StagedModel, at: &StageInputs) -> Result<Vec<Tensor>, ModelError> {
    model.check_inputs(&at.inputs)?;
    let mut values: Vec<Tensor> = Vec::new();
    for i in 0..model.stages() {
        let made = model.stage(i, &values, at)?;
        if i + 1 == model.stages() {
            return Ok(made);
        }
        values.extend(made);
    }
    Err(ModelError::BadInput {
        input: "x",
        reason: "the model has no stages".into(),
    })
}

/// A [`BlockModel`] (a prologue, a chain of blocks and a head) as stages: the prologue (conditioning vector, then
/// the first hidden state), one stage per block, and the head. Groups are the sharded engine's: `rest`, then one
/// per block.
pub struct Chain {
    model: Box<dyn BlockModel>,
    kind: Kind,
}

impl Chain {
    pub fn new(model: Box<dyn BlockModel>) -> Self {
        Self {
            model,
            kind: Kind::Float,
        }
    }
}

impl StagedModel for Chain {
    fn groups(&self) -> Vec<String> {
        std::iter::once("rest".to_string())
            .chain((0..self.model.depth()).map(|i| format!("blocks.{i}")))
            .collect()
    }

    fn group_of(&self, name: &str) -> usize {
        self.model.block_of(name).map_or(0, |i| i + 1)
    }

    fn stages(&self) -> usize {
        self.model.depth() + 2
    }

    fn stage_of(&self, name: &str) -> usize {
        if let Some(i) = self.model.block_of(name) {
            return i + 1;
        }
        let head = self.model.rest_parts().head;
        if head.iter().any(|p| name.starts_with(p)) {
            self.model.depth() + 1
        } else {
            0
        }
    }

    fn check_inputs(&self, inputs: &ModelInputs) -> Result<(), ModelError> {
        self.model.check_inputs(inputs)
    }

    fn stage(
        &self,
        i: usize,
        values: &[Tensor],
        at: &StageInputs,
    ) -> Result<Vec<Tensor>, ModelError> {
        let depth = self.model.depth();
        let missing = || ModelError::BadInput {
            input: "x",
            reason: format!("stage {i} ran before the prologue"),
        };
        if i == 0 {
            return Ok(vec![
                self.model.condition(&at.inputs),
                self.model.embed(at.inputs.x),
            ]);
        }
        let (c, h) = (
            values.first().ok_or_else(missing)?,
            values.last().ok_or_else(missing)?,
        );
        Ok(vec![if i <= depth {
            self.model.block(i - 1, h, c, self.kind)
        } else {
            self.model.head(h, c)
        }])
    }

    fn normalized_rows(&self, name: &str) -> bool {
        self.model.normalized_rows(name)
    }

    fn set_precision(&mut self, precision: Precision) {
        self.kind = precision.compute_kind();
        self.model.set_precision(precision);
    }
}
