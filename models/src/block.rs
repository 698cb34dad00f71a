//! What the engine trains: any model made of a prologue (an input embedding and a conditioning vector), a stack of
//! blocks and a head, whose parameters split into one group per block and a "rest" group. RadiT implements it
//! (`model::RadiT`); the engine itself knows no model's parameter names and no loss.

use tch::{Kind, Tensor};

use crate::error::ModelError;
use crate::precision::Precision;

/// One micro-batch's model inputs: the (noised) input and its conditions.
#[derive(Clone, Copy)]
pub struct ModelInputs<'a> {
    pub x: &'a Tensor,
    pub t: &'a Tensor,
    pub labels: &'a Tensor,
    pub age: &'a Tensor,
}

/// The rest group's parameters by where their gradient comes from, as name prefixes: the head (with the loss),
/// the input embedding (through the prologue's hidden state) and the conditioning (through the conditioning
/// vector).
#[derive(Debug, Clone, Copy)]
pub struct RestParts {
    pub head: &'static [&'static str],
    pub input: &'static [&'static str],
    pub conditioning: &'static [&'static str],
}

/// A model the engine can shard and schedule block by block.
pub trait BlockModel: Send {
    fn depth(&self) -> usize;
    /// The block a parameter belongs to; `None`: the rest group.
    fn block_of(&self, name: &str) -> Option<usize>;
    fn rest_parts(&self) -> RestParts;
    /// Shapes, kinds and ranges of one micro-batch, checked before anything is gathered.
    fn check_inputs(&self, inputs: &ModelInputs) -> Result<(), ModelError>;
    /// The first hidden state, [B, N, D] fp32.
    fn embed(&self, x: &Tensor) -> Tensor;
    /// The conditioning vector, [B, D] fp32.
    fn condition(&self, inputs: &ModelInputs) -> Tensor;
    /// Block `i` in `kind`.
    fn block(&self, i: usize, h: &Tensor, c: &Tensor, kind: Kind) -> Tensor;
    /// The output (for RadiT, the velocity) from the last hidden state.
    fn head(&self, h: &Tensor, c: &Tensor) -> Tensor;
    fn set_precision(&mut self, precision: Precision);
    /// Whether a parameter is kept at unit RMS per row by forced weight normalisation after every step.
    fn normalized_rows(&self, _name: &str) -> bool {
        false
    }
}
