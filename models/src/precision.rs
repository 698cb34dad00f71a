//! The numeric mode a model computes in, shared by the models and the engine that schedules them.

use tch::Kind;

/// Numeric mode of the forward pass. Parameters always stay fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in fp32 (the CPU default and the parity reference).
    #[default]
    Fp32,
    /// Matmuls and attention in bf16; norms, modulation, the residual stream and the loss in fp32 (for GPUs).
    Bf16,
}

impl Precision {
    /// The default on `device`: bf16 on GPUs, fp32 on CPUs.
    pub fn default_on(device: tch::Device) -> Self {
        if device.is_cuda() {
            Precision::Bf16
        } else {
            Precision::Fp32
        }
    }

    pub fn compute_kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        }
    }
}
